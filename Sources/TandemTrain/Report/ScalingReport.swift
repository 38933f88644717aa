// The scaling benchmark's report (`trainer bench-report`, run by launch/scaling-benchmark): the
// `trainer bench --json` rows of every layout and rank count, and `trainer bench-allreduce --json`
// results, turned into results.json, a markdown table and scaling.svg.
//
// Speedup is throughput against the one-rank row of the same model and mode: images/s(np) /
// images/s(1). In strong scaling (fixed global batch) that is the usual T1/Tn; in weak scaling
// (fixed per-rank batch, global batch 64 * np) it is the scaled speedup, np * T1/Tn. Efficiency is
// speedup / np. Rows with more ranks than cores are marked oversubscribed: ranks then share cores,
// so their speedup says how the job degrades, not how it scales. Rows run with `bench --interleave`
// also give the job's images/s as a share of its own ranks training apart in the same seconds, which
// the host's drift between separate runs does not move (the speedup compares runs seconds apart).
import Foundation

public struct ScalingRow {
    public var model: String, layout: String, mode: String
    public var np: Int, globalBatch: Int
    public var imagesPerSecond: Double
    public var msPerStep: Double, allreduceWaitMs: Double
    public var oversubscribed: Bool
    public var speedup = Double.nan, efficiency = Double.nan
    /// With `bench --interleave`: the job's images/s over its ranks' own apart (`synced_over_apart`).
    public var ofRanksApart = Double.nan
    /// The `trainer bench --json` object this row came from (with speedup and efficiency added).
    public var raw: [String: Any]

    /// A row from `trainer bench --json`; the model, layout and mode come from its tags
    /// (`--tag model=... --tag layout=... --tag mode=...`), else from the config and the layout.
    public init(bench j: [String: Any]) throws {
        guard let ips = j["images_per_second"] as? Double, let np = j["world_size"] as? Int, let batch = j["batch_size"] as? Int else {
            throw ConfigError("not a `trainer bench --json` result: images_per_second, world_size or batch_size missing")
        }
        let tags = j["tags"] as? [String: String] ?? [:]
        let towers = j["towers"] as? Int ?? 1
        let config = (j["config"] as? String).map { URL(fileURLWithPath: $0).deletingPathExtension().lastPathComponent } ?? "?"
        model = tags["model"] ?? config
        layout = tags["layout"] ?? (towers > 1 ? (np > towers ? "\(np / towers)x\(towers) hybrid" : "\(towers) towers") : "data parallel")
        mode = tags["mode"] ?? "strong"
        self.np = np
        globalBatch = batch
        imagesPerSecond = ips
        msPerStep = j["ms_per_step"] as? Double ?? Double(batch) / ips * 1000
        allreduceWaitMs = (j["phases_ms"] as? [String: Double])?["allreduce_wait"] ?? 0
        oversubscribed = j["oversubscribed"] as? Bool ?? false
        ofRanksApart = (j["interleaved"] as? [String: Any])?["synced_over_apart"] as? Double ?? .nan
        raw = j
    }

    /// Allreduce wait as a share of the step, in percent.
    public var allreduceWaitPercent: Double { 100 * allreduceWaitMs / max(msPerStep, 1e-12) }
}

public struct AllreduceResult {
    public var worldSize: Int
    public var oversubscribed: Bool
    public var memcpyGBps: Double
    /// Per size: bytes, median microseconds, algorithm and bus bandwidth (GB/s), ring bound (us).
    public var rows: [(bytes: Int, medianUs: Double, algbw: Double, busbw: Double, boundUs: Double)]
    public var raw: [String: Any]

    public init(_ j: [String: Any]) throws {
        guard let p = j["world_size"] as? Int, let mem = j["memcpy_gbps"] as? Double, let rs = j["rows"] as? [[String: Any]] else {
            throw ConfigError("not a `trainer bench-allreduce --json` result: world_size, memcpy_gbps or rows missing")
        }
        worldSize = p
        oversubscribed = j["oversubscribed"] as? Bool ?? false
        memcpyGBps = mem
        func number(_ r: [String: Any], _ key: String) -> Double { (r[key] as? NSNumber)?.doubleValue ?? .nan }
        rows = rs.map { r in
            (Int(exactly: number(r, "bytes")) ?? 0, number(r, "median_us"), number(r, "algbw_gbps"), number(r, "busbw_gbps"), number(r, "ring_bound_us"))
        }
        raw = j
    }
}

public enum ScalingReport {
    /// Fills in speedup and efficiency against the one-rank row of the same model and mode.
    public static func computeSpeedups(_ rows: inout [ScalingRow]) {
        for i in rows.indices {
            let r = rows[i]
            guard let base = rows.first(where: { $0.model == r.model && $0.mode == r.mode && $0.np == 1 }) else { continue }
            rows[i].speedup = r.imagesPerSecond / base.imagesPerSecond
            rows[i].efficiency = rows[i].speedup / Double(r.np)
            rows[i].raw["speedup"] = rows[i].speedup
            rows[i].raw["efficiency"] = rows[i].efficiency
        }
    }

    static func f(_ x: Double, _ format: String) -> String { x.isFinite ? String(format: format, x) : "-" }

    /// The markdown tables: the scaling rows, then (if any) the allreduce sizes.
    public static func markdown(rows: [ScalingRow], allreduce: [AllreduceResult]) -> String {
        var s = ""
        if !rows.isEmpty {
            s += "| model | layout | np | mode | global batch | images/s | speedup | efficiency | of ranks apart | allreduce wait % | oversubscribed |\n"
            s += "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n"
        }
        for r in rows {
            s += "| \(r.model) | \(r.layout) | \(r.np) | \(r.mode) | \(r.globalBatch) | \(f(r.imagesPerSecond, "%.0f")) | \(f(r.speedup, "%.2f")) | "
            s += "\(f(r.efficiency * 100, "%.0f%%")) | \(f(r.ofRanksApart * 100, "%.1f%%")) | \(f(r.allreduceWaitPercent, "%.1f")) | \(r.oversubscribed ? "oversubscribed" : "") |\n"
        }
        for a in allreduce {
            s += (s.isEmpty ? "" : "\n") + "Allreduce, \(a.worldSize) ranks\(a.oversubscribed ? " (oversubscribed)" : ""); memcpy \(f(a.memcpyGBps, "%.2f")) GB/s; "
            s += "ring bound = 2(p-1)/p x bytes / memcpy bandwidth\n\n"
            s += "| bytes | median us | algbw GB/s | busbw GB/s | ring bound us | bound / median |\n|---:|---:|---:|---:|---:|---:|\n"
            for r in a.rows {
                s += "| \(r.bytes) | \(f(r.medianUs, "%.1f")) | \(f(r.algbw, "%.3f")) | \(f(r.busbw, "%.3f")) | \(f(r.boundUs, "%.1f")) | \(f(r.boundUs / r.medianUs, "%.2f")) |\n"
            }
        }
        return s
    }

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

    /// scaling.svg: speedup and efficiency against ranks (a line per model, layout family and mode,
    /// from its one-rank row; ideal speedup dashed; oversubscribed ranks shaded), and, with
    /// allreduce results, bus bandwidth against message size next to memcpy bandwidth.
    public static func svg(rows: [ScalingRow], allreduce: [AllreduceResult], cores: Int, title: String) -> String {
        // One line per model, mode and family (data parallel, data parallel with balanced or dynamic
        // shares, or towers: 2 towers and 2x2 hybrid together).
        func family(_ r: ScalingRow) -> String {
            switch r.layout {
            case "data parallel": "DP"
            case "data parallel, balanced": "DP balanced"
            case "data parallel, dynamic": "DP dynamic"
            default: "towers"
            }
        }
        var keys: [String] = []
        var lines: [String: [(Double, Double, Double)]] = [:]   // key -> (np, speedup, efficiency)
        // One colour per model and family (strong solid, weak dashed), named once in a legend under
        // the two panels, so that the lines stay visible.
        var colorKeys: [String] = []
        var colorOf: [String: Int] = [:]   // key -> palette index
        for r in rows where r.speedup.isFinite {
            let fams = r.np == 1 ? Array(Set(rows.filter { $0.model == r.model && $0.mode == r.mode }.map(family))).sorted() : [family(r)]
            for fam in fams {
                let key = "\(r.model) \(fam) \(r.mode)", colorKey = "\(r.model) \(fam)"
                if !colorKeys.contains(colorKey) { colorKeys.append(colorKey) }
                if lines[key] == nil { keys.append(key); colorOf[key] = colorKeys.firstIndex(of: colorKey)! }
                lines[key, default: []].append((Double(r.np), r.speedup, r.efficiency))
            }
        }
        let maxNP = Double(rows.map(\.np).max() ?? 1)
        var speed: [Series] = [Series(name: "ideal", color: "#888", points: [(1, 1), (maxNP, maxNP)], dashed: true)]
        var eff: [Series] = [Series(name: "ideal", color: "#888", points: [(1, 1), (maxNP, 1)], dashed: true)]
        for key in keys {
            let pts = lines[key]!.sorted { $0.0 < $1.0 }
            let color = palette[colorOf[key]! % palette.count]
            speed.append(Series(name: key, color: color, points: pts.map { ($0.0, $0.1) }, dashed: key.hasSuffix("weak")))
            eff.append(Series(name: key, color: color, points: pts.map { ($0.0, $0.2) }, dashed: key.hasSuffix("weak")))
        }
        let npTicks = Array(Set(rows.map(\.np))).sorted().map { (Double($0), "\($0)") }
        let w = 1300.0, h = 420.0
        let panels = allreduce.isEmpty ? 2 : 3
        let pw = w / Double(panels)
        let columns = 5, legendRows = (colorKeys.count + 1 + columns - 1) / columns
        let legendTop = 24 + h + 8
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(legendTop + Double(legendRows) * 16 + 10))\" font-family=\"sans-serif\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(w / 2)\" y=\"18\" text-anchor=\"middle\" font-size=\"13\" fill=\"#333\">\(xmlEscape(title))</text>\n"
        let shade = Double(cores) < maxNP ? Double(cores) + 0.5 : nil
        s += xyPanel(title: "Speedup (images/s vs 1 rank)", xLabel: "ranks", yLabel: "speedup", series: speed, x0: 0, y0: 24, width: pw, height: h,
                     xTicks: npTicks, yMin: 0, shadeFrom: shade, legend: false)
        s += xyPanel(title: "Efficiency (speedup / ranks)", xLabel: "ranks", yLabel: "efficiency", series: eff, x0: pw, y0: 24, width: pw, height: h,
                     xTicks: npTicks, yMin: 0, shadeFrom: shade, legend: false)
        // The two panels' legend: each model and family (the title says strong solid, weak dashed),
        // then the ideal line.
        let entries = colorKeys.enumerated().map { ($0.element, palette[$0.offset % palette.count], false) } + [("ideal", "#888", true)]
        let columnWidth = (w - 60) / Double(columns)
        for (k, e) in entries.enumerated() {
            let x = 60 + Double(k % columns) * columnWidth, y = legendTop + Double(k / columns) * 16 + 10
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%@\" stroke-width=\"2\"%@/>", x, y - 4, x + 20, y - 4, e.1,
                        e.2 ? " stroke-dasharray=\"5,3\"" : "")
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%@</text>\n", x + 25, y, xmlEscape(e.0))
        }
        if !allreduce.isEmpty {
            var bw: [Series] = []
            for (k, a) in allreduce.enumerated() {
                let color = palette[k % palette.count]
                bw.append(Series(name: "busbw np \(a.worldSize)\(a.oversubscribed ? " (oversub.)" : "")", color: color,
                                 points: a.rows.map { (log2(Double($0.bytes)), $0.busbw) }))
            }
            let sizes = allreduce.flatMap { $0.rows.map(\.bytes) }
            if let lo = sizes.min(), let hi = sizes.max(), let mem = allreduce.first?.memcpyGBps {
                bw.append(Series(name: "memcpy (1 rank)", color: "#888", points: [(log2(Double(lo)), mem), (log2(Double(hi)), mem)], dashed: true))
            }
            let ticks = Array(Set(sizes)).sorted().enumerated().filter { $0.offset % 2 == 0 }.map { (log2(Double($0.element)), byteLabel($0.element)) }
            s += xyPanel(title: "Allreduce bus bandwidth", xLabel: "message size", yLabel: "GB/s", series: bw, x0: 2 * pw, y0: 24, width: pw, height: h,
                         xTicks: ticks, yMin: 0, shadeFrom: nil)
        }
        s += "</svg>\n"
        return s
    }

    static func byteLabel(_ b: Int) -> String { b >= 1 << 20 ? "\(b >> 20)M" : b >= 1024 ? "\(b >> 10)K" : "\(b)" }

    /// A panel with x ticks at given positions, y from `yMin` (or the data) to the data's maximum,
    /// one polyline with markers per series, a legend, and optionally the region x >= `shadeFrom` shaded.
    static func xyPanel(title: String, xLabel: String, yLabel: String, series: [Series], x0: Double, y0: Double, width: Double, height: Double,
                        xTicks: [(Double, String)], yMin: Double?, shadeFrom: Double?, legend: Bool = true) -> String {
        let ys = series.flatMap { $0.points.map(\.1) }.filter { $0.isFinite }
        let xs = series.flatMap { $0.points.map(\.0) } + xTicks.map(\.0)
        var lo = yMin ?? (ys.min() ?? 0), hi = (ys.max() ?? 1) * 1.08
        if hi - lo < 1e-9 { hi = lo + 1 }
        if yMin == nil { lo -= (hi - lo) * 0.05 }
        let xlo = (xs.min() ?? 0) - 0.3, xhi = (xs.max() ?? 1) + 0.3
        let left = x0 + 60, right = x0 + width - 10, top = y0 + 30, bottom = y0 + height - 40
        func px(_ x: Double) -> Double { left + (right - left) * (x - xlo) / max(xhi - xlo, 1e-9) }
        func py(_ y: Double) -> Double { bottom - (bottom - top) * (y - lo) / (hi - lo) }
        var s = "<text x=\"\(x0 + width / 2)\" y=\"\(y0 + 18)\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">\(xmlEscape(title))</text>\n"
        if let shadeFrom, shadeFrom < xhi {
            s += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#f3f3f3\"/>", px(shadeFrom), top, right - px(shadeFrom), bottom - top)
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" font-size=\"11\" fill=\"#777\">oversubscribed</text>\n", right - 4, bottom - 6)
        }
        s += "<rect x=\"\(left)\" y=\"\(top)\" width=\"\(right - left)\" height=\"\(bottom - top)\" fill=\"none\" stroke=\"#444\"/>\n"
        for i in 0...5 {
            let v = lo + (hi - lo) * Double(i) / 5
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>", left, py(v), right, py(v))
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" font-size=\"11\">%@</text>\n", left - 6, py(v) + 4, String(format: "%.3g", v))
        }
        for (x, label) in xTicks {
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>", px(x), bottom, px(x), bottom + 5)
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"11\">%@</text>\n", px(x), bottom + 18, label)
        }
        s += SVGPlot.axisTitles(x: xLabel, y: yLabel, x0: x0, left: left, right: right, top: top, bottom: bottom)
        for (k, ser) in series.enumerated() {
            s += SVGPlot.curve(ser, px: px, py: py, markers: ser.name != "ideal" && !ser.name.hasPrefix("memcpy"))
            guard legend else { continue }
            let ly = top + 14 + Double(k) * 15
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%@\" stroke-width=\"2\"%@/>", left + 8, ly - 4, left + 28, ly - 4, ser.color,
                        ser.dashed ? " stroke-dasharray=\"5,3\"" : "")
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%@</text>\n", left + 33, ly, xmlEscape(ser.name))
        }
        return s
    }

    static func xmlEscape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
