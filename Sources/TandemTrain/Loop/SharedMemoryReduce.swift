// The gradient allreduce of ranks that share one machine, through memory they all map (the
// intra-node half of what NCCL and Horovod do), with no MPI call and no thread.
//
// Why: over MPI (OpenMPI 4.1, shared-memory transport) LeNet-5's 247 KB of gradients took 66-172 us
// per allreduce alone and 0.1-0.2 ms of each rank's compute per step in the sync thread's wake-ups
// and copies, on the core backward runs on; and a non-blocking collective moves only inside MPI
// calls, hence session 4's progress pokes and naps. Here each step's work is memory passes the
// training thread does itself, between backward layers, when the data is there: with the gradients
// in the slot (session 6), summing its slice in place and copying the other slices' sums (2 ranks:
// 2.5 bytes read and written per gradient byte, against 5.5 copying the buffer in and out).
//
// Layout of the segment (POSIX shared memory, mapped by every rank of the replica group):
//   flags: per rank, per bucket, three 64-bit step numbers, each on its own cache line:
//     ready     this step's gradients of the bucket are in the rank's slot (backward wrote them there,
//               or, with a buffer of its own, all but its own slice were copied in)
//     reduced   the rank has summed its slice of the bucket (in its own slot)
//     gathered  the rank has copied every slice's sum out (it reads no slot of this bucket again)
//   slots: per rank, the whole flat gradient buffer (parameterCount floats, 64-byte aligned). For
//          the training loop the slot *is* the rank's gradient buffer (backward writes it), so
//          posting a bucket copies nothing; `single` (bench-allreduce) copies a buffer of its own in.
//   sharded update only: the parameters, then the SGD velocity (parameterCount floats each).
//   scalars: per rank a flag line (the number of its last `sumScalars`) and two buffers of
//            `scalarCapacity` doubles, used in turn (see `sumScalars`).
// Each bucket is cut into one slice per rank. A step (number s, from 1):
//   release(b): wait until every rank's gathered[b] >= s-1 (none still reads my slot from the last
//               step); with a buffer of its own, copy b but my own slice into my slot (only the
//               other ranks read those); ready[b] = s;
//   then, polled: once every ready[b] >= s, sum slice `rank` of every slot (ranks in order 0, 1, ...;
//               my own part read from my gradients) into my slot's slice, reduced[b] = s;
//               once every reduced[b] >= s, copy each other rank's summed slice from its slot into
//               my gradients (and my own from my slot, with a buffer of its own), gathered[b] = s.
// With the gradients in the slot, the next step's backward overwrites the slot: before it zeroes
// the buffer, the network asks `awaitSlotFree`, which waits until every rank's gathered[b] >= s for
// every bucket (in the training loop at once: its per-step loss allreduce, which every rank enters
// only after `finish`, already orders it).
// Sharded update (session 8, `--update sharded`, the default): the segment also holds one copy of
// the parameters and one of the SGD velocity, which every rank's network and optimiser use. A rank
// that has summed its slice of a bucket applies the optimiser step to that slice of the shared
// parameters at once (between backward layers, while the other ranks may still run backward on
// earlier layers: every rank's ready[b] says none reads bucket b's parameters again this step), and
// nothing is copied out: `gathered` then only says the rank has seen every slice updated. Each rank
// so updates 1/ranks of the parameters instead of all of them, the sums' copy-out is gone, and the
// machine holds one copy of the model and its optimiser state instead of one per rank (ZeRO stage 1
// within a machine, with no allgather since the parameters are shared). `finish` returns once every
// rank has updated its slices, so the next forward reads the new parameters everywhere.
// Every slice is summed by one rank, in rank order, so every rank gets the same bits. Flags are
// stored with release and loaded with acquire ordering. The loss gradient is already scaled by
// 1 / global batch, so the sum is the average gradient.
import CKernels
import Foundation
import Synchronization
import TandemComm
import TandemCore

/// Memory every rank of a communicator maps: POSIX shared memory that rank 0 creates and unlinks
/// once every rank has mapped it (nothing is left in /dev/shm, even if the job dies).
final class SharedSegment {
    let base: UnsafeMutableRawPointer
    let bytes: Int

    private init(base: UnsafeMutableRawPointer, bytes: Int) {
        self.base = base
        self.bytes = bytes
    }

    deinit { munmap(base, bytes) }

    /// Segments made by this process (in the name, with the pid and a random number).
    private static let made = Atomic<Int>(0)

    /// Maps `bytes` of zeroed memory on every rank of `comm`, or returns why not (the same on every
    /// rank): the ranks are on different machines, or the memory could not be had (a small
    /// /dev/shm: the space is reserved up front, so that touching it later cannot fault).
    /// Every rank must call it; it runs collectives on `comm`.
    static func make(comm: Communicator, bytes: Int) throws -> Result<SharedSegment, Reason> {
        // Same machine: every rank's host name equals rank 0's.
        var host = [UInt8](repeating: 0, count: 256)
        host.withUnsafeMutableBufferPointer { h in
            h.baseAddress!.withMemoryRebound(to: CChar.self, capacity: 256) { _ = gethostname($0, 255) }
        }
        var hosts = [UInt8](repeating: 0, count: 256 * comm.size)
        try host.withUnsafeBytes { h in try hosts.withUnsafeMutableBytes { try comm.allgather(h.baseAddress!, bytes: 256, into: $0.baseAddress!) } }
        for r in 1..<comm.size where hosts[(256 * r)..<(256 * r + 256)] != hosts[0..<256] {
            return .failure(.otherMachines)
        }
        #if canImport(Glibc)
        // Rank 0 creates it and sends its size and name (status byte, 8 bytes of size, the name).
        var message = [UInt8](repeating: 0, count: 136)
        var mapped: UnsafeMutableRawPointer?
        var failure = ""
        // Until every rank has mapped it (or a collective failed), rank 0's name exists and this
        // rank's mapping is its own to drop.
        var created: String?
        var kept = false
        defer {
            if let created { shm_unlink(created) }
            if !kept, let mapped { munmap(mapped, bytes) }
        }
        if comm.rank == 0 {
            let serial = made.add(1, ordering: .relaxed).newValue
            let name = "/tandem-\(getpid())-\(serial)-\(UInt32.random(in: 0...UInt32.max))"
            let fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0o600)
            if fd < 0 {
                failure = "shm_open \(name): \(String(cString: strerror(errno)))"
            } else {
                created = name
                let code = posix_fallocate(fd, 0, off_t(bytes))
                if code != 0 {
                    failure = "reserving \(bytes) bytes in /dev/shm: \(String(cString: strerror(code)))"
                } else {
                    mapped = map(fd, bytes)
                    if mapped == nil { failure = "mmap of \(bytes) bytes: \(String(cString: strerror(errno)))" }
                }
                close(fd)
            }
            message[0] = mapped == nil ? 0 : 1
            withUnsafeBytes(of: Int64(bytes)) { message.replaceSubrange(1..<9, with: $0) }
            let utf8 = Array((mapped == nil ? failure : created!).utf8.prefix(126))
            message.replaceSubrange(9..<(9 + utf8.count), with: utf8)
        }
        try message.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: 136, root: 0) }
        let text = String(decoding: message[9...].prefix { $0 != 0 }, as: UTF8.self)
        guard message[0] == 1 else { return .failure(.noMemory(text)) }
        if comm.rank != 0 {
            let rootBytes = message[1..<9].withUnsafeBytes { $0.loadUnaligned(as: Int64.self) }
            if rootBytes != Int64(bytes) {
                // Ranks with different models (the config check that follows names the difference).
                failure = "rank \(comm.rank) needs \(bytes) bytes, rank 0 \(rootBytes)"
            } else {
                let fd = shm_open(text, O_RDWR, 0)
                if fd < 0 {
                    failure = "opening \(text): \(String(cString: strerror(errno)))"
                } else {
                    mapped = map(fd, bytes)
                    if mapped == nil { failure = "mmap of \(text): \(String(cString: strerror(errno)))" }
                    close(fd)
                }
            }
        }
        // Every rank tells whether it mapped it; then the name goes (the defer).
        var ok: Int64 = mapped == nil ? 0 : 1
        var all = [Int64](repeating: 0, count: comm.size)
        try withUnsafeBytes(of: &ok) { o in try all.withUnsafeMutableBytes { try comm.allgather(o.baseAddress!, bytes: 8, into: $0.baseAddress!) } }
        if let first = all.firstIndex(of: 0) {
            return .failure(.noMemory(comm.rank == first ? failure : "rank \(first) could not map it"))
        }
        kept = true
        return .success(SharedSegment(base: mapped!, bytes: bytes))
        #else
        return .failure(.noMemory("POSIX shared memory is used on Linux only"))
        #endif
    }

    #if canImport(Glibc)
    private static func map(_ fd: Int32, _ bytes: Int) -> UnsafeMutableRawPointer? {
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        return p == MAP_FAILED ? nil : p
    }
    #endif

    enum Reason: Error, CustomStringConvertible {
        case otherMachines
        case noMemory(String)
        var description: String {
            switch self {
            case .otherMachines: "the ranks are on more than one machine"
            case .noMemory(let why): "no shared memory (\(why))"
            }
        }
    }
}

/// The shared-memory allreduce of one replica group's gradient buckets (see the top of the file).
/// Used by one thread (the rank's training thread); a step allocates nothing.
public final class SharedMemoryReduce {
    let rank: Int
    let ranks: Int
    private let segment: SharedSegment
    /// The buffer summed in place: this rank's slot (the training loop's gradients) or `single`'s own.
    let gradients: UnsafeMutablePointer<Float>
    /// Whether `gradients` is this rank's slot (nothing to copy in, nor my own slice out).
    private let inSlot: Bool
    private let bucketCount: Int
    /// Bucket b's slices: rank q's is cuts[b * (ranks + 1) + q] ..< cuts[b * (ranks + 1) + q + 1].
    private let cuts: UnsafeMutablePointer<Int>
    /// Every rank's slot.
    private let slots: UnsafeMutablePointer<UnsafePointer<Float>?>
    /// Per bucket, every rank's slot at the start of this rank's slice (the sum's sources, in rank order).
    private let sources: UnsafeMutablePointer<UnsafePointer<Float>?>
    private let mySlot: UnsafeMutablePointer<Float>
    /// Flags: ranks x buckets x 3 cache lines of 8 UInt64 (one used per line).
    private let flags: UnsafeMutablePointer<UInt64>
    /// Per bucket: 0 not released this step, 1 waiting for every rank's ready, 2 for every rank's
    /// reduced, 3 done.
    private let state: UnsafeMutablePointer<Int>
    /// Per bucket, this step's release and completion times, and when every rank had released it.
    let started: UnsafeMutablePointer<Double>
    let ended: UnsafeMutablePointer<Double>
    let allReleased: UnsafeMutablePointer<Double>
    /// The step number (1 for the first).
    private var sequence: UInt64 = 0
    private var stepOpen = false
    /// Buckets completed this step.
    private var completed = 0
    /// Sharded update: the parameters and velocity every rank shares (in the segment), the
    /// optimiser that updates this rank's slices as they are summed, and this step's learning rate.
    let sharedParameters: UnsafeMutablePointer<Float>?
    let sharedVelocity: UnsafeMutablePointer<Float>?
    var optimizer: SGD<Float>? {
        didSet { shardedOptimizer = optimizer }
    }
    /// `optimizer`, read in the hot path without retaining it (`optimizer` keeps it alive).
    private unowned(unsafe) var shardedOptimizer: SGD<Float>?
    var learningRate = 0.0
    /// `sumScalars`: the most doubles one call sums, per rank its flag and two buffers, and the
    /// number of calls so far.
    let scalarCapacity: Int
    private let scalarFlags: UnsafeMutablePointer<UInt64>
    private let scalarSlots: UnsafeMutablePointer<Double>
    private let scalarStride: Int
    private var scalarCalls: UInt64 = 0

    private static let ready = 0, reduced = 1, gathered = 2

    /// Every rank of `comm` must call it with the same buckets; runs collectives on `comm`.
    /// - Parameters:
    ///   - count: floats in the buffer the buckets cut.
    ///   - buffer: nil to sum this rank's slot in place (`gradients`, zeroed), or a buffer of its own.
    ///   - sharded: also hold the parameters and velocity that every rank shares (the sharded update).
    ///   - scalars: the most doubles one `sumScalars` call sums (0: none).
    /// - Returns: why not, when the ranks cannot share memory.
    static func make(comm: Communicator, count: Int, buckets: [Range<Int>], buffer: UnsafeMutablePointer<Float>? = nil, sharded: Bool = false,
                     scalars: Int = 0) throws -> Result<SharedMemoryReduce, SharedSegment.Reason> {
        let slotFloats = (count + 15) / 16 * 16
        let flagBytes = comm.size * buckets.count * 3 * 64
        let floats = (comm.size + (sharded ? 2 : 0)) * slotFloats
        let scalarStride = (2 * max(1, scalars) + 7) / 8 * 8 + 8   // two buffers, then the flag line
        switch try SharedSegment.make(comm: comm, bytes: flagBytes + floats * MemoryLayout<Float>.stride + comm.size * scalarStride * 8) {
        case .failure(let reason): return .failure(reason)
        case .success(let segment):
            return .success(SharedMemoryReduce(comm: comm, segment: segment, flagBytes: flagBytes, slotFloats: slotFloats, buffer: buffer, buckets: buckets,
                                               sharded: sharded, scalars: max(1, scalars), scalarStride: scalarStride))
        }
    }

    private init(comm: Communicator, segment: SharedSegment, flagBytes: Int, slotFloats: Int, buffer: UnsafeMutablePointer<Float>?, buckets: [Range<Int>],
                 sharded: Bool, scalars: Int, scalarStride: Int) {
        rank = comm.rank
        ranks = comm.size
        self.segment = segment
        bucketCount = buckets.count
        flags = segment.base.bindMemory(to: UInt64.self, capacity: flagBytes / 8)
        let slotBase = (segment.base + flagBytes).bindMemory(to: Float.self, capacity: (ranks + (sharded ? 2 : 0)) * slotFloats)
        sharedParameters = sharded ? slotBase + ranks * slotFloats : nil
        sharedVelocity = sharded ? slotBase + (ranks + 1) * slotFloats : nil
        // Floats so far are a multiple of 16 per slot: the scalars start on a cache line.
        let scalarBase = UnsafeMutableRawPointer(slotBase + (ranks + (sharded ? 2 : 0)) * slotFloats).bindMemory(to: Double.self, capacity: ranks * scalarStride)
        scalarCapacity = scalars
        self.scalarStride = scalarStride
        scalarSlots = scalarBase
        scalarFlags = UnsafeMutableRawPointer(scalarBase + scalarStride - 8).assumingMemoryBound(to: UInt64.self)
        slots = .allocate(capacity: ranks)
        for q in 0..<ranks { slots[q] = UnsafePointer(slotBase + q * slotFloats) }
        mySlot = slotBase + rank * slotFloats
        gradients = buffer ?? mySlot
        inSlot = buffer == nil
        // Slice boundaries on multiples of 16 floats (64 bytes from the slot's start), so that two
        // ranks never write the same cache line.
        cuts = .allocate(capacity: buckets.count * (ranks + 1))
        for (b, range) in buckets.enumerated() {
            for q in 0...ranks {
                let even = range.lowerBound + range.count * q / ranks
                cuts[b * (ranks + 1) + q] = q == 0 ? range.lowerBound : q == ranks ? range.upperBound : min(range.upperBound, max(range.lowerBound, (even + 15) / 16 * 16))
            }
        }
        sources = .allocate(capacity: buckets.count * ranks)
        // My own slice's part of the sum comes from my gradients, which hold the same values my slot
        // would (so the sums are those of the slots): its copy into my slot is saved.
        for b in 0..<buckets.count {
            for q in 0..<ranks { sources[b * ranks + q] = q == rank ? UnsafePointer(self.gradients + cuts[b * (ranks + 1) + rank]) : slots[q]! + cuts[b * (ranks + 1) + rank] }
        }
        state = .allocate(capacity: buckets.count)
        state.initialize(repeating: 0, count: buckets.count)
        started = .allocate(capacity: buckets.count)
        ended = .allocate(capacity: buckets.count)
        allReleased = .allocate(capacity: buckets.count)
    }

    deinit {
        slots.deallocate(); sources.deallocate(); cuts.deallocate(); state.deallocate()
        started.deallocate(); ended.deallocate(); allReleased.deallocate()
    }

    @inline(__always)
    private func flag(_ q: Int, _ b: Int, _ kind: Int) -> UnsafeMutablePointer<UInt64> {
        flags + ((q * bucketCount + b) * 3 + kind) * 8
    }

    @inline(__always)
    private func everyRank(_ b: Int, _ kind: Int, atLeast s: UInt64) -> Bool {
        for q in 0..<ranks where tandem_load_acquire_u64(flag(q, b, kind)) < s { return false }
        return true
    }

    /// Backward has finished bucket b's gradients: posts them. Waits (spinning) only if another rank
    /// still reads this rank's slot from the previous step.
    func release(_ b: Int) {
        if !stepOpen {
            sequence += 1
            stepOpen = true
            completed = 0
        }
        let c = cuts + b * (ranks + 1)
        let lo = c[0], hi = c[ranks], mineLo = c[rank], mineHi = c[rank + 1]
        var spin = Backoff()
        while !everyRank(b, Self.gathered, atLeast: sequence - 1) { spin.pause() }
        started[b] = Clock.now
        if !inSlot {
            // The other ranks read the slices before and after mine.
            (mySlot + lo).update(from: gradients + lo, count: mineLo - lo)
            (mySlot + mineHi).update(from: gradients + mineHi, count: hi - mineHi)
        }
        tandem_store_release_u64(flag(rank, b, Self.ready), sequence)
        state[b] = 1
        progress()
    }

    /// With the gradients in the slot: returns once every rank has copied the last step's sums out
    /// of every bucket (so that this rank may zero and rewrite its slot), spinning meanwhile.
    func awaitSlotFree() {
        guard inSlot && !stepOpen else { return }
        var spin = Backoff()
        for b in 0..<bucketCount {
            while !everyRank(b, Self.gathered, atLeast: sequence) { spin.pause() }
        }
    }

    /// Moves every released bucket on as far as the other ranks allow, without waiting.
    func progress() {
        guard stepOpen else { return }
        for b in 0..<bucketCount {
            let c = cuts + b * (ranks + 1)
            if state[b] == 1 && everyRank(b, Self.ready, atLeast: sequence) {
                allReleased[b] = Clock.now
                let lo = c[rank], hi = c[rank + 1]
                if hi > lo {
                    tandem_sum_sources_f32(mySlot + lo, sources + b * ranks, ranks, hi - lo)
                    if let optimizer = shardedOptimizer { optimizer.step(range: lo..<hi, parameters: sharedParameters!, gradients: mySlot, lr: learningRate) }
                }
                tandem_store_release_u64(flag(rank, b, Self.reduced), sequence)
                state[b] = 2
            }
            if state[b] == 2 && everyRank(b, Self.reduced, atLeast: sequence) {
                // Sharded: every slice is updated in the shared parameters; no sum is needed here.
                if shardedOptimizer == nil {
                    for q in 0..<ranks where !(inSlot && q == rank) {
                        let lo = c[q], hi = c[q + 1]
                        (gradients + lo).update(from: slots[q]! + lo, count: hi - lo)
                    }
                }
                tandem_store_release_u64(flag(rank, b, Self.gathered), sequence)
                state[b] = 3
                ended[b] = Clock.now
                completed += 1
            }
        }
    }

    /// Rank q's flag for `sumScalars`.
    @inline(__always)
    private func scalarFlag(_ q: Int) -> UnsafeMutablePointer<UInt64> {
        UnsafeMutableRawPointer(scalarFlags).advanced(by: q * scalarStride * 8).assumingMemoryBound(to: UInt64.self)
    }

    /// The sum over the ranks of `count` doubles, in place, the same bits on every rank (summed in
    /// rank order): the per-step loss allreduce without MPI. Every rank calls it in the same order.
    /// Each call writes one of two buffers, in turn: a rank writes a buffer again only two calls
    /// later, after every rank has posted the call in between, so after every rank has read it.
    /// A rank that never comes leaves this waiting: the collective watchdog ends the job.
    func sumScalars(_ values: UnsafeMutablePointer<Double>, count: Int) {
        precondition(count <= scalarCapacity, "sumScalars of \(count) values, room for \(scalarCapacity)")
        scalarCalls += 1
        let buffer = Int(scalarCalls & 1) * scalarCapacity
        (scalarSlots + rank * scalarStride + buffer).update(from: values, count: count)
        tandem_store_release_u64(scalarFlag(rank), scalarCalls)
        var spin = Backoff()
        for q in 0..<ranks where q != rank {
            while tandem_load_acquire_u64(scalarFlag(q)) < scalarCalls { spin.pause() }
        }
        for i in 0..<count {
            var sum = scalarSlots[buffer + i]
            for q in 1..<ranks { sum += scalarSlots[q * scalarStride + buffer + i] }
            values[i] = sum
        }
    }

    /// One allreduce of a single buffer (`trainer bench-allreduce`): the sum over ranks in place.
    /// - Returns: nil (on every rank) when the ranks cannot share memory.
    public static func single(comm: Communicator, buffer: UnsafeMutableBufferPointer<Float>) throws -> SharedMemoryReduce? {
        if case .success(let engine) = try make(comm: comm, count: buffer.count, buckets: [0..<buffer.count], buffer: buffer.baseAddress!) { return engine }
        return nil
    }

    /// The buffer's allreduce, for an engine from `single`.
    public func allreduce() { finish() }

    /// Releases the buckets not yet released and returns once every bucket is summed into the
    /// gradients. A rank that never comes leaves this waiting: the collective watchdog ends the job.
    func finish() {
        for b in 0..<bucketCount where !stepOpen || state[b] == 0 { release(b) }
        var spin = Backoff()
        while completed < bucketCount {
            progress()
            if completed < bucketCount { spin.pause() }
        }
        for b in 0..<bucketCount { state[b] = 0 }
        stepOpen = false
    }
}

/// Waiting for another rank: spins (pause) for 20 us, then yields the core on every turn, and after
/// 2 ms sleeps 50 us per turn, so that ranks sharing cores (more ranks than cores, where the
/// scheduler honours a yield only weakly) leave the core to the rank being waited for.
struct Backoff {
    private var since = 0.0
    mutating func pause() {
        let now = Clock.now
        if since == 0 { since = now }
        let waited = now - since
        if waited < 20e-6 {
            for _ in 0..<16 { tandem_cpu_relax() }
        } else if waited < 2e-3 {
            sched_yield()
        } else {
            usleep(50)
        }
    }
}
