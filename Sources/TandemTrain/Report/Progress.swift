// Progress on rank 0: a bar redrawn in place on a terminal; otherwise a plain line every few seconds.
import Foundation

public final class ProgressDisplay {
    let interactive: Bool
    let interval: Double
    var lastPrint = 0.0
    var drewBar = false

    public init(interactive: Bool = isatty(STDOUT_FILENO) != 0, interval: Double = 5) {
        self.interactive = interactive
        self.interval = interval
    }

    /// Reports training progress; cheap to call every step.
    public func update(epoch: Int, epochs: Int, step: Int, stepsInEpoch: Int, loss: Double, imagesPerSecond: Double, secondsLeft: Double, now: Double) {
        if interactive {
            guard now - lastPrint >= 0.1 else { return }
            lastPrint = now
            let width = 24
            let done = Int(Double(width) * Double(step) / Double(max(stepsInEpoch, 1)))
            let bar = String(repeating: "#", count: done) + String(repeating: ".", count: max(0, width - done))
            let line = String(format: "\r\u{1B}[2Kepoch %d/%d [%@] %d/%d  loss %.4f  %@ img/s  left %@",
                              epoch, epochs, bar, step, stepsInEpoch, loss, formatCount(imagesPerSecond), formatDuration(secondsLeft))
            FileHandle.standardOutput.write(Data(line.utf8))
            drewBar = true
        } else {
            guard now - lastPrint >= interval else { return }
            lastPrint = now
            print(String(format: "epoch %d/%d step %d/%d loss %.4f %@ img/s, %@ left", epoch, epochs, step, stepsInEpoch, loss,
                         formatCount(imagesPerSecond), formatDuration(secondsLeft)))
            fflush(stdout)
        }
    }

    /// Prints a line of its own, clearing the bar first.
    public func line(_ text: String) {
        if interactive && drewBar { FileHandle.standardOutput.write(Data("\r\u{1B}[2K".utf8)); drewBar = false }
        print(text)
        fflush(stdout)
    }
}

public func formatCount(_ v: Double) -> String {
    let n = Int(v.rounded())
    let digits = String(n)
    var out = ""
    for (i, ch) in digits.reversed().enumerated() {
        if i > 0 && i % 3 == 0 { out.append(",") }
        out.append(ch)
    }
    return String(out.reversed())
}

public func formatDuration(_ s: Double) -> String {
    guard s.isFinite, s >= 0 else { return "?" }
    let t = Int(s.rounded())
    return t >= 3600 ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
}
