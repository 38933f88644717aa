// TandemData: gzip in memory with zlib's inflate/deflate.
//
// We inflate ourselves rather than use gzopen/gzread because gzread hands back whatever it could decode from
// a truncated stream; with inflate we see the missing end-of-stream marker and report it.

import CZlib

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes 1f 8b.
///
/// - Parameter path: the file to read; its name does not matter, only its first two bytes.
/// - Returns: the file's bytes, or the decompressed bytes for a gzip file (all members of a multi-member file).
/// - Throws: `DataError` naming `path` when the file is missing or unreadable, when the gzip data is corrupt
///   or truncated (no end-of-stream marker), or when the result would exceed 2 GiB.
public func readMaybeGzip(_ path: String) throws -> [UInt8] {
    try Gzip.readFile(path).bytes
}

/// Whole-buffer gzip compression and decompression.
enum Gzip {
    /// The two bytes every gzip member starts with (RFC 1952).
    static let magic: (UInt8, UInt8) = (0x1f, 0x8b)

    /// True when `bytes` starts with the gzip magic.
    static func isGzip(_ bytes: [UInt8]) -> Bool {
        bytes.count >= 2 && bytes[0] == magic.0 && bytes[1] == magic.1
    }

    /// Reads `path`, decompressing if it is gzip; `gzipped` says which happened (for error messages).
    static func readFile(_ path: String) throws -> (bytes: [UInt8], gzipped: Bool) {
        let raw = try BinaryFile.load(path)
        guard isGzip(raw) else { return (raw, false) }
        return (try decompress(raw, path: path), true)
    }

    // MARK: - Decompression

    /// Decompresses a gzip buffer (one or more concatenated members).
    ///
    /// Trailing zero bytes after the last member are tolerated (some tools pad); anything else after it is an error,
    /// as is a stream that ends before its end-of-stream marker or whose CRC / length trailer does not match.
    static func decompress(_ input: [UInt8], path: String) throws -> [UInt8] {
        if input.isEmpty { throw DataError(path: path, "truncated gzip data: the file is empty") }
        var stream = z_stream()
        // 15 + 16: largest window, expect a gzip (not zlib) header and check the gzip trailer.
        guard inflateInit2_(&stream, 15 + 16, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw DataError(path: path, "cannot start gzip decompression (zlib: \(message(stream)))")
        }
        defer { inflateEnd(&stream) }

        var output = [UInt8](repeating: 0, count: initialCapacity(for: input))
        var produced = 0
        var consumed = 0
        while true {
            if produced == output.count {
                if output.count >= BinaryFile.maxBytes {
                    throw DataError(path: path, "gzip data decompresses to more than the 2 GiB limit")
                }
                let grow = min(output.count, BinaryFile.maxBytes - output.count)
                output.append(contentsOf: repeatElement(0, count: max(grow, 1 << 16)))
            }
            // avail_in / avail_out are 32-bit; both buffers are at most 2 GiB (+ growth step), so clamp for safety.
            let inCount = min(input.count - consumed, Int(UInt32.max))
            let outCount = min(output.count - produced, Int(UInt32.max))
            let status: Int32 = input.withUnsafeBufferPointer { inBuf in
                output.withUnsafeMutableBufferPointer { outBuf in
                    stream.next_in = UnsafeMutablePointer(mutating: inBuf.baseAddress! + consumed)
                    stream.avail_in = UInt32(inCount)
                    stream.next_out = outBuf.baseAddress! + produced
                    stream.avail_out = UInt32(outCount)
                    let status = inflate(&stream, Z_NO_FLUSH)
                    // The pointers are only valid inside these closures; keep offsets instead.
                    consumed += inCount - Int(stream.avail_in)
                    produced += outCount - Int(stream.avail_out)
                    stream.next_in = nil
                    stream.next_out = nil
                    return status
                }
            }
            switch status {
            case Z_STREAM_END:
                let rest = input[consumed...]
                if rest.isEmpty || rest.allSatisfy({ $0 == 0 }) {
                    if produced > BinaryFile.maxBytes {
                        throw DataError(path: path, "gzip data decompresses to more than the 2 GiB limit")
                    }
                    output.removeSubrange(produced...)
                    return output
                }
                guard rest.count >= 2, input[consumed] == magic.0, input[consumed + 1] == magic.1 else {
                    throw DataError(path: path, "\(rest.count) bytes of trailing data after the gzip stream at offset \(consumed)")
                }
                guard inflateReset(&stream) == Z_OK else {
                    throw DataError(path: path, "cannot restart gzip decompression (zlib: \(message(stream)))")
                }
            case Z_OK, Z_BUF_ERROR:
                // Z_BUF_ERROR means no progress was possible: with output room left, the input ran out.
                if produced < output.count && consumed == input.count {
                    throw DataError(path: path, "truncated gzip data: the stream ends after \(input.count) bytes "
                        + "without its end-of-stream marker (\(produced) bytes decompressed)")
                }
            case Z_NEED_DICT:
                throw DataError(path: path, "corrupt gzip data (zlib: stream needs a preset dictionary)")
            case Z_MEM_ERROR:
                throw DataError(path: path, "out of memory while decompressing gzip data")
            default:
                throw DataError(path: path, "corrupt gzip data (zlib: \(message(stream)))")
            }
        }
    }

    /// A first output size: the gzip trailer's ISIZE (length mod 2^32), clamped to what deflate can possibly
    /// produce from this input (at most 1032:1) and to the 2 GiB limit, so a corrupt trailer cannot make us over-allocate.
    private static func initialCapacity(for input: [UInt8]) -> Int {
        var hint = 1 << 16
        if input.count >= 18 {
            let n = input.count
            let isize = Int(input[n - 4]) | Int(input[n - 3]) << 8 | Int(input[n - 2]) << 16 | Int(input[n - 1]) << 24
            hint = max(hint, isize)
        }
        let bound = input.count > (BinaryFile.maxBytes / 1032) ? BinaryFile.maxBytes : input.count * 1032 + (1 << 16)
        return max(1, min(hint, bound, BinaryFile.maxBytes))
    }

    // MARK: - Compression

    /// Compresses `input` into a single gzip member at zlib's default level.
    static func compress(_ input: [UInt8], path: String) throws -> [UInt8] {
        var stream = z_stream()
        // 15 + 16: largest window, write a gzip header and trailer; memory level 8 is zlib's default.
        guard deflateInit2_(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY,
                            zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw DataError(path: path, "cannot start gzip compression (zlib: \(message(stream)))")
        }
        defer { deflateEnd(&stream) }
        precondition(input.count <= Int(UInt32.max), "Gzip.compress: input of \(input.count) bytes is too large")

        let bound = Int(deflateBound(&stream, uLong(input.count)))
        var output = [UInt8](repeating: 0, count: bound)
        // deflateBound is enough for one Z_FINISH call, so a single call must end the stream.
        let status: Int32 = input.withUnsafeBufferPointer { inBuf in
            output.withUnsafeMutableBufferPointer { outBuf in
                stream.next_in = UnsafeMutablePointer(mutating: inBuf.baseAddress)
                stream.avail_in = UInt32(inBuf.count)
                stream.next_out = outBuf.baseAddress
                stream.avail_out = UInt32(outBuf.count)
                let status = deflate(&stream, Z_FINISH)
                stream.next_in = nil
                stream.next_out = nil
                return status
            }
        }
        guard status == Z_STREAM_END else {
            throw DataError(path: path, "gzip compression failed (zlib: \(message(stream)))")
        }
        output.removeSubrange(Int(stream.total_out)...)
        return output
    }

    /// zlib's message for the last error on `stream`, or a generic one.
    private static func message(_ stream: z_stream) -> String {
        stream.msg.map { String(cString: $0) } ?? "unknown error"
    }
}
