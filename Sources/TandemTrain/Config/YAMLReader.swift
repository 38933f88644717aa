// A thin typed walk over a YAML document that remembers where it is, so that every error names
// the file, the line and the key path ("configs/x.yaml:14: model.layers[3].kernel: ...").
import Foundation
import Yams

/// A configuration the trainer cannot use, with the file, key and what was expected.
public struct ConfigError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

struct YAMLValue {
    let node: Yams.Node
    let path: String
    let file: String

    var location: String {
        if let mark = node.mark { return "\(file):\(mark.line)" }
        return file
    }

    func error(_ what: String) -> ConfigError { ConfigError("\(location): \(path.isEmpty ? "(top level)" : path): \(what)") }

    private func child(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    var describedValue: String {
        switch node {
        case let .scalar(s): "'\(s.string)'"
        case .mapping: "a mapping"
        case .sequence: "a list"
        }
    }

    // MARK: - Mappings

    func mapping() throws(ConfigError) -> [(String, YAMLValue)] {
        guard case let .mapping(m) = node else { throw error("expected a mapping of keys, got \(describedValue)") }
        var out: [(String, YAMLValue)] = []
        for (k, v) in m {
            guard case let .scalar(ks) = k else { throw error("keys must be plain names") }
            out.append((ks.string, YAMLValue(node: v, path: child(ks.string), file: file)))
        }
        return out
    }

    /// The mapping's values by key, after checking that no key is outside `allowed`.
    func fields(_ allowed: [String]) throws(ConfigError) -> [String: YAMLValue] {
        var out: [String: YAMLValue] = [:]
        for (k, v) in try mapping() {
            guard allowed.contains(k) else {
                throw ConfigError("\(v.location): \(child(k)): unknown key (expected one of: \(allowed.joined(separator: ", ")))")
            }
            out[k] = v
        }
        return out
    }

    // MARK: - Scalars

    var isNull: Bool {
        if case let .scalar(s) = node { return s.string == "~" || s.string == "null" || (s.string.isEmpty && s.style == .plain) }
        return false
    }

    func string() throws(ConfigError) -> String {
        guard case let .scalar(s) = node else { throw error("expected a string, got \(describedValue)") }
        return s.string
    }

    func int() throws(ConfigError) -> Int {
        guard case let .scalar(s) = node, let v = Int(s.string.replacingOccurrences(of: "_", with: "")) else {
            throw error("expected an integer, got \(describedValue)")
        }
        return v
    }

    func positiveInt() throws(ConfigError) -> Int {
        let v = try int()
        guard v > 0 else { throw error("expected a positive integer, got \(v)") }
        return v
    }

    func nonNegativeInt() throws(ConfigError) -> Int {
        let v = try int()
        guard v >= 0 else { throw error("expected an integer >= 0, got \(v)") }
        return v
    }

    func double() throws(ConfigError) -> Double {
        guard case let .scalar(s) = node, let v = Double(s.string.replacingOccurrences(of: "_", with: "")), v.isFinite else {
            throw error("expected a number, got \(describedValue)")
        }
        return v
    }

    func bool() throws(ConfigError) -> Bool {
        guard case let .scalar(s) = node else { throw error("expected true or false, got \(describedValue)") }
        switch s.string.lowercased() {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default: throw error("expected true or false, got \(describedValue)")
        }
    }

    func choice<E: RawRepresentable & CaseIterable>(_ type: E.Type) throws(ConfigError) -> E where E.RawValue == String {
        let s = try string()
        guard let v = E(rawValue: s) else {
            throw error("expected one of \(E.allCases.map(\.rawValue).joined(separator: ", ")), got '\(s)'")
        }
        return v
    }

    // MARK: - Lists

    func list() throws(ConfigError) -> [YAMLValue] {
        guard case let .sequence(seq) = node else { throw error("expected a list, got \(describedValue)") }
        return seq.enumerated().map { YAMLValue(node: $1, path: "\(path)[\($0)]", file: file) }
    }

    /// An integer, or a pair [height, width].
    func pair() throws(ConfigError) -> (Int, Int) {
        if case .sequence = node {
            let items = try list()
            guard items.count == 2 else { throw error("expected an integer or [height, width], got a list of \(items.count)") }
            return (try items[0].int(), try items[1].int())
        }
        guard case let .scalar(s) = node, let v = Int(s.string) else {
            throw error("expected an integer or [height, width], got \(describedValue)")
        }
        return (v, v)
    }

    func doubles() throws(ConfigError) -> [Double] {
        if case .scalar = node { return [try double()] }
        var out: [Double] = []
        for item in try list() { out.append(try item.double()) }
        return out
    }
}
