// curves.svg: loss and accuracy against epoch, two panels, readable in any browser.
import Foundation

public struct Series {
    public var name: String
    public var color: String
    public var points: [(Double, Double)]
    public var dashed = false
    public init(name: String, color: String, points: [(Double, Double)], dashed: Bool = false) {
        self.name = name; self.color = color; self.points = points; self.dashed = dashed
    }
}

public enum SVGPlot {
    /// A panel: axes with ticks, one polyline per series (markers when a series is short), a legend.
    static func panel(title: String, yLabel: String, series: [Series], x0: Double, y0: Double, width: Double, height: Double, xMax: Double,
                      legendAtBottom: Bool = false) -> String {
        let all = series.flatMap { $0.points.map(\.1) }.filter { $0.isFinite }
        var lo = all.min() ?? 0, hi = all.max() ?? 1
        if hi - lo < 1e-9 { lo -= 0.5; hi += 0.5 }
        let pad = (hi - lo) * 0.05
        lo -= pad; hi += pad
        let left = x0 + 60, right = x0 + width - 10, top = y0 + 30, bottom = y0 + height - 40
        func px(_ x: Double) -> Double { left + (right - left) * x / max(xMax, 1e-9) }
        func py(_ y: Double) -> Double { bottom - (bottom - top) * (y - lo) / (hi - lo) }
        var s = "<text x=\"\(x0 + width / 2)\" y=\"\(y0 + 18)\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">\(title)</text>\n"
        s += "<rect x=\"\(left)\" y=\"\(top)\" width=\"\(right - left)\" height=\"\(bottom - top)\" fill=\"none\" stroke=\"#444\"/>\n"
        for i in 0...5 {
            let v = lo + (hi - lo) * Double(i) / 5
            let y = py(v)
            s += "<line x1=\"\(left)\" y1=\"\(y)\" x2=\"\(right)\" y2=\"\(y)\" stroke=\"#ddd\"/>"
            s += "<text x=\"\(left - 6)\" y=\"\(y + 4)\" text-anchor=\"end\" font-size=\"11\">\(String(format: "%.3g", v))</text>\n"
        }
        let ticks = max(1, Int(xMax.rounded(.up)))
        let stepTick = max(1, ticks / 10)
        for i in stride(from: 0, through: ticks, by: stepTick) {
            let x = px(Double(i))
            s += "<line x1=\"\(x)\" y1=\"\(bottom)\" x2=\"\(x)\" y2=\"\(bottom + 5)\" stroke=\"#444\"/>"
            s += "<text x=\"\(x)\" y=\"\(bottom + 18)\" text-anchor=\"middle\" font-size=\"11\">\(i)</text>\n"
        }
        s += axisTitles(x: "epoch", y: yLabel, x0: x0, left: left, right: right, top: top, bottom: bottom)
        for (k, ser) in series.enumerated() {
            s += curve(ser, px: px, py: py, markers: ser.points.count <= 40)
            let ly = legendAtBottom ? bottom - 10 - Double(series.count - 1 - k) * 16 : top + 14 + Double(k) * 16
            s += "<line x1=\"\(right - 150)\" y1=\"\(ly - 4)\" x2=\"\(right - 130)\" y2=\"\(ly - 4)\" stroke=\"\(ser.color)\" stroke-width=\"2\"/>"
            s += "<text x=\"\(right - 125)\" y=\"\(ly)\" font-size=\"12\">\(ser.name)</text>\n"
        }
        return s
    }

    /// The x and y axis titles of a panel whose plot area is [left, right] x [top, bottom].
    static func axisTitles(x: String, y: String, x0: Double, left: Double, right: Double, top: Double, bottom: Double) -> String {
        "<text x=\"\((left + right) / 2)\" y=\"\(bottom + 34)\" text-anchor=\"middle\" font-size=\"12\">\(x)</text>\n"
            + "<text x=\"\(x0 + 14)\" y=\"\((top + bottom) / 2)\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 \(x0 + 14) \((top + bottom) / 2))\">\(y)</text>\n"
    }

    /// One series as a polyline (dashed if asked) through its finite points, with markers if `markers`.
    static func curve(_ ser: Series, px: (Double) -> Double, py: (Double) -> Double, markers: Bool) -> String {
        var s = ""
        let pts = ser.points.filter { $0.1.isFinite }
        if pts.count > 1 {
            let path = pts.map { String(format: "%.1f,%.1f", px($0.0), py($0.1)) }.joined(separator: " ")
            s += "<polyline fill=\"none\" stroke=\"\(ser.color)\" stroke-width=\"1.6\"\(ser.dashed ? " stroke-dasharray=\"5,3\"" : "") points=\"\(path)\"/>\n"
        }
        if markers {
            for p in pts { s += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%@\"/>", px(p.0), py(p.1), ser.color) }
            s += "\n"
        }
        return s
    }

    /// Writes the two-panel figure.
    public static func curves(title: String, loss: [Series], accuracy: [Series], epochs: Double) -> String {
        let w = 900.0, h = 380.0
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h + 30))\" font-family=\"sans-serif\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(w / 2)\" y=\"18\" text-anchor=\"middle\" font-size=\"13\" fill=\"#333\">\(title)</text>\n"
        s += panel(title: "Loss", yLabel: "loss", series: loss, x0: 0, y0: 24, width: w / 2, height: h, xMax: epochs)
        s += panel(title: "Accuracy", yLabel: "accuracy", series: accuracy, x0: w / 2, y0: 24, width: w / 2, height: h, xMax: epochs, legendAtBottom: true)
        s += "</svg>\n"
        return s
    }
}
