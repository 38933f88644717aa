// TandemData: whole-file reads and writes with POSIX calls, so that errors can name the file and the reason.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads and writes whole files as byte arrays.
///
/// Every size that comes from outside (file sizes, dataset headers, gzip output) is held to `maxBytes`,
/// so a corrupt or hostile file can neither exhaust memory nor overflow an `Int` computation.
enum BinaryFile {
    /// The largest file, decompressed stream or dataset payload we accept: 2 GiB.
    static let maxBytes = 1 << 31

    /// What kind of thing, if anything, is at `path`.
    enum Kind { case missing, file, directory }

    /// Looks at `path` without following it any further than `stat` does.
    static func kind(of path: String) -> Kind {
        var info = stat()
        guard stat(path, &info) == 0 else { return .missing }
        // S_IFMT / S_IFDIR spelled out: Swift does not import the Glibc macros they expand to.
        return (info.st_mode & 0o170000) == 0o040000 ? .directory : .file
    }

    /// Reads the whole of `path`.
    ///
    /// Throws a `DataError` naming the path when it does not exist, is a folder, cannot be read,
    /// or is larger than `maxBytes`.
    static func load(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        if fd < 0 {
            let code = errno
            if code == ENOENT { throw DataError(path: path, "file does not exist") }
            throw DataError(path: path, "cannot open: \(reason(code))")
        }
        defer { close(fd) }

        var info = stat()
        guard fstat(fd, &info) == 0 else { throw DataError(path: path, "cannot stat: \(reason(errno))") }
        if (info.st_mode & 0o170000) == 0o040000 { throw DataError(path: path, "is a folder, expected a file") }
        let statSize = Int(info.st_size)
        if statSize > maxBytes { throw DataError(path: path, "file is \(statSize) bytes, over the 2 GiB limit") }

        // One byte more than stat says, so the common case ends with a single zero-length read.
        var bytes = [UInt8](repeating: 0, count: max(statSize, 0) + 1)
        var filled = 0
        while true {
            if filled == bytes.count {
                // Only files that grow while we read them (or that stat cannot size, like pipes) get here.
                if bytes.count > maxBytes { throw DataError(path: path, "file is over the 2 GiB limit") }
                bytes.append(contentsOf: repeatElement(0, count: max(bytes.count, 1 << 16)))
            }
            let got = bytes.withUnsafeMutableBytes { buffer in
                read(fd, buffer.baseAddress! + filled, buffer.count - filled)
            }
            if got < 0 {
                let code = errno
                if code == EINTR { continue }
                throw DataError(path: path, "cannot read: \(reason(code))")
            }
            if got == 0 { break }
            filled += got
        }
        if filled > maxBytes { throw DataError(path: path, "file is \(filled) bytes, over the 2 GiB limit") }
        bytes.removeSubrange(filled...)
        return bytes
    }

    /// Writes `bytes` to `path`, replacing any file there.
    static func store(_ bytes: [UInt8], at path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        if fd < 0 { throw DataError(path: path, "cannot create: \(reason(errno))") }
        var written = 0
        while written < bytes.count {
            let put = bytes.withUnsafeBytes { buffer in
                write(fd, buffer.baseAddress! + written, buffer.count - written)
            }
            if put < 0 {
                let code = errno
                if code == EINTR { continue }
                close(fd)
                throw DataError(path: path, "cannot write: \(reason(code))")
            }
            written += put
        }
        if close(fd) != 0 { throw DataError(path: path, "cannot write: \(reason(errno))") }
    }

    // MARK: - Paths

    /// `dir/name`, without doubling a trailing slash.
    static func join(_ dir: String, _ name: String) -> String {
        dir.hasSuffix("/") ? dir + name : dir + "/" + name
    }

    /// The last component of a path, for messages that name a second file.
    static func fileName(_ path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? path
    }

    /// The C library's text for an errno value.
    private static func reason(_ code: Int32) -> String {
        String(cString: strerror(code))
    }
}
