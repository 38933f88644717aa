import CKernels

// The layer types: each binds a kernel pair of Kernels/ to its tensors.

// MARK: - Convolution

final class ConvolutionLayer<T: Scalar>: Layer<T> {
    let g: ConvGeometry
    let hasBias: Bool
    /// Column matrices of every group (kept from forward for the weight gradient), GEMM scratch.
    var cols: UnsafeMutablePointer<T>!
    var tmp: UnsafeMutablePointer<T>!
    var dcol: UnsafeMutablePointer<T>!
    /// The direct path's padded input and weight-gradient sums (Float first layers, see `direct`).
    var padded: UnsafeMutablePointer<Float>?
    var sums: UnsafeMutablePointer<Float>?

    /// Scratch of the channel-vectorised direct path (Float, `ConvGeometry.allowsChannelDirect`): the
    /// padded inputs kept for the weight gradient, the transposed weights, the weight-gradient sums.
    struct ChannelDirect {
        let padded, weights, sums: UnsafeMutablePointer<Float>
    }
    var channelDirect: ChannelDirect?
    /// The input gradient as a channel-vectorised convolution of dy (`ConvGeometry.inputGradientAsConvolution`):
    /// its geometry, dy padded, the flipped weights in the kernels' layout. Allocated once bound, if dx is needed.
    struct TransposedDirect {
        let g: ConvGeometry
        let padded, weights: UnsafeMutablePointer<Float>
    }
    var transposedDirect: TransposedDirect?
    /// The ReLU that follows this layer is applied here, as the output is written (see Network).
    var fusesReLU = false

    init(node: Node, capacity: Int, geometry: ConvGeometry, bias: Bool) {
        g = geometry
        hasBias = bias
        super.init(node: node, capacity: capacity)
        if T.self == Float.self && g.allowsChannelDirect {
            channelDirect = ChannelDirect(
                padded: own(allocateZeroed(Float.self, count: tandem_cv_padded_count(capacity, g.c))),
                weights: own(allocateZeroed(Float.self, count: tandem_cv_weights_count(g.outC, g.c))),
                sums: own(allocateZeroed(Float.self, count: tandem_cv_grad_scratch(g.outC, g.c))))
        } else if !(T.self == Float.self && g.allowsDirect) {
            allocateColumns()
        }   // else: once bound, unless it convolves directly
        // GEMM scratch for one chunk (a smaller batch never has larger chunks).
        let chunk = g.isPointwise ? 0 : g.chunkSamples(batch: capacity)
        tmp = own(allocateZeroed(T.self, count: g.outGroup * chunk * g.outPlane))
        dcol = own(allocateZeroed(T.self, count: g.k * chunk * g.outPlane))
        if T.self == Float.self && g.allowsDirect && channelDirect == nil {
            padded = own(allocateZeroed(Float.self, count: tandem_direct_padded_count(capacity, g.c)))
            sums = own(allocateZeroed(Float.self, count: tandem_direct_grad_scratch(g.outC, g.c)))
        }
    }

    /// Column matrices for every group of the whole capacity, kept from forward for the weight gradient.
    private func allocateColumns() {
        let perGroup = g.isPointwise ? 0 : g.k * capacity * g.outPlane
        cols = own(allocateZeroed(T.self, count: perGroup * g.groups))
    }

    /// A first layer that may convolve directly knows whether it does only once its input gradient is
    /// bound: it allocates its column matrices (LeNet-5's conv1: 5 MB at batch 64) only if not.
    override func bound() {
        if channelDirect == nil && cols == nil && !direct { allocateColumns() }
        // Only where the 16-wide tiles can run: there it halves the input gradient's time (the small
        // AlexNet's conv3 backward 20.1-20.4 -> 13.0-15.3 ms with its weight gradient), while with 8-wide
        // tiles OpenBLAS's GEMM + col2im stays a little faster (25.5-26.7 against 27.4-28.4 ms). Decided
        // by the machine, not by the tiles' current width, so a network's arithmetic never depends on
        // when it was built.
        if channelDirect != nil, tandem_wide_kernels_available() != 0, dx.contains(where: { $0 != nil }),
           let t = g.inputGradientAsConvolution {
            transposedDirect = TransposedDirect(
                g: t, padded: own(allocateZeroed(Float.self, count: tandem_cv_padded_count(capacity, t.c))),
                weights: own(allocateZeroed(Float.self, count: tandem_cv_weights_count(t.outC, t.c))))
        }
    }

    /// A layer with few input channels at stride 1 whose input needs no gradient (a network's first
    /// layer) convolves directly in Float: its column matrix would be kH*kW times its input and its
    /// GEMM has few rows (LeNet-5's conv1: 25 x 50,176 columns for 6 output channels).
    private(set) lazy var direct: Bool = padded != nil && dx.allSatisfy { $0 == nil }

    override func forward(_ c: PassContext) {
        let bias = hasBias ? w + g.outC * g.k : nil
        if let cd = channelDirect {
            tandem_cv_weights_f32(cd.weights, floats(w), g.outC, g.c)
            tandem_cv_forward_f32(floats(y0(c)), cd.padded, floats(x0(c)), cd.weights, bias.map(floats), c.count, g.outC, g.c,
                                  fusesReLU ? 1 : 0)
            return
        }
        if direct, let padded {
            tandem_direct_conv_forward_f32(floats(y0(c)), padded, floats(x0(c)), floats(w), bias.map(floats), c.count, g.outC, g.c,
                                           fusesReLU ? 1 : 0)
            return
        }
        convForward(y0(c), cols: cols, tmp: tmp, x0(c), weight: w, bias: bias, n: c.count, g, chunk: g.chunkSamples(batch: c.count),
                    relu: fusesReLU)
    }

    override func backward(_ c: PassContext) {
        if let cd = channelDirect {
            tandem_cv_weight_grad_f32(floats(dw), hasBias ? floats(dw + g.outC * g.k) : nil, cd.sums, floats(dy0(c)), cd.padded,
                                      c.count, g.outC, g.c)
            if let t = transposedDirect, let dx = dx0(c) {
                tandem_cv_transposed_weights_f32(t.weights, floats(w), g.outC, g.c)
                tandem_cv_forward_f32(floats(dx), t.padded, floats(dy0(c)), t.weights, nil, c.count, t.g.outC, t.g.c, 0)
                return
            }
            // Otherwise the input gradient through GEMM and col2im (see `inputGradientAsConvolution`).
            if let dx = dx0(c) {
                convBackward(dx, dWeight: nil, dBias: nil, tmp: tmp, dcol: dcol, dy0(c), x: x0(c), cols: nil, weight: w, n: c.count, g,
                             chunk: g.chunkSamples(batch: c.count))
            }
            return
        }
        if direct, let padded, let sums {
            tandem_direct_conv_weight_grad_f32(floats(dw), hasBias ? floats(dw + g.outC * g.k) : nil, sums, floats(dy0(c)), padded,
                                               c.count, g.outC, g.c)
            return
        }
        convBackward(dx0(c), dWeight: dw, dBias: hasBias ? dw + g.outC * g.k : nil, tmp: tmp, dcol: dcol,
                     dy0(c), x: x0(c), cols: cols, weight: w, n: c.count, g, chunk: g.chunkSamples(batch: c.count))
    }
}

// MARK: - Pooling

final class MaxPoolLayer<T: Scalar>: Layer<T> {
    let g: PoolGeometry
    var argmax: UnsafeMutablePointer<Int32>!
    /// The ReLU before this pool, which only this pool reads, is applied here in backward: dx is that
    /// ReLU's dx, and the gradient passes where the pool's output is positive (see Network).
    var masksReLU = false

    init(node: Node, capacity: Int, geometry: PoolGeometry) {
        g = geometry
        super.init(node: node, capacity: capacity)
        argmax = own(allocateZeroed(Int32.self, count: capacity * node.outputShape.count))
    }
    override func forward(_ c: PassContext) { maxPoolForward(y0(c), argmax: argmax, x0(c), n: c.count, g) }
    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        maxPoolBackward(d, dy0(c), argmax: argmax, n: c.count, g, relu: masksReLU ? UnsafePointer(y0(c)) : nil)
    }
}

final class AvgPoolLayer<T: Scalar>: Layer<T> {
    let g: PoolGeometry
    init(node: Node, capacity: Int, geometry: PoolGeometry) {
        g = geometry
        super.init(node: node, capacity: capacity)
    }
    override func forward(_ c: PassContext) { avgPoolForward(y0(c), x0(c), n: c.count, g) }
    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        avgPoolBackward(d, dy0(c), n: c.count, g)
    }
}

final class GlobalAvgPoolLayer<T: Scalar>: Layer<T> {
    override func forward(_ c: PassContext) {
        globalAvgPoolForward(y0(c), x0(c), planes: c.count * inShape.channels, plane: inShape.plane)
    }
    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        globalAvgPoolBackward(d, dy0(c), planes: c.count * inShape.channels, plane: inShape.plane)
    }
}

// MARK: - Pointwise

final class ActivationLayer<T: Scalar>: Layer<T> {
    let function: Activation
    /// A ReLU fused into the convolution or batch norm before it: the two share their buffers, that layer
    /// applied it, and backward masks the gradient in place (x > 0 exactly where ReLU(x) > 0).
    var fused = false
    /// A ReLU that only a max pool reads leaves its backward to the pool (MaxPoolLayer.masksReLU).
    var backwardInPool = false
    init(node: Node, capacity: Int, function: Activation) {
        self.function = function
        super.init(node: node, capacity: capacity)
    }
    override func forward(_ c: PassContext) {
        if fused { return }
        activationForward(y0(c), x0(c), count: c.count * inShape.count, function)
    }
    override func backward(_ c: PassContext) {
        guard !backwardInPool, let d = dx0(c) else { return }
        activationBackward(d, dy0(c), x: x0(c), y: y0(c), count: c.count * inShape.count, function)
    }
}

final class LRNLayer<T: Scalar>: Layer<T> {
    let p: LRNParameters
    var scale: UnsafeMutablePointer<T>!
    var ratio: UnsafeMutablePointer<T>!
    init(node: Node, capacity: Int, parameters: LRNParameters) {
        p = parameters
        super.init(node: node, capacity: capacity)
        scale = own(allocateZeroed(T.self, count: capacity * inShape.count))
        ratio = own(allocateZeroed(T.self, count: inShape.count))
    }
    override func forward(_ c: PassContext) {
        lrnForward(y0(c), scale: scale, x0(c), n: c.count, channels: inShape.channels, plane: inShape.plane, p)
    }
    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        lrnBackward(d, ratio: ratio, dy0(c), x: x0(c), y: y0(c), scale: scale, n: c.count, channels: inShape.channels, plane: inShape.plane, p)
    }
}

final class DropoutLayer<T: Scalar>: Layer<T> {
    let rate: Double
    let salt: UInt64
    var mask: UnsafeMutablePointer<T>!
    var active = false
    init(node: Node, capacity: Int, rate: Double) {
        self.rate = rate
        salt = stableHash(node.name)
        super.init(node: node, capacity: capacity)
        mask = own(allocateZeroed(T.self, count: capacity * node.inputShapes[0].count))
    }
    override func forward(_ c: PassContext) {
        let count = c.count * inShape.count
        active = c.training && rate > 0
        guard active else { y0(c).update(from: x0(c), count: count); return }
        dropoutMask(mask, rate: rate, seed: c.seed, salt: salt, step: c.step, firstSample: c.globalOffset + c.start, n: c.count,
                    features: inShape.count, featureOffset: node.channelOffset * inShape.plane)
        multiply(y0(c), x0(c), mask, count: count)
    }
    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        let count = c.count * inShape.count
        if active { multiply(d, dy0(c), mask, count: count) } else { d.update(from: dy0(c), count: count) }
    }
}

// MARK: - Batch normalisation

final class BatchNormLayer<T: Scalar>: Layer<T> {
    let eps: Double
    let momentum: Double
    let reducer: StatisticsReducer?
    var xhat: UnsafeMutablePointer<T>!
    /// Per channel: mean, inverse standard deviation, and a 2C scratch for sums.
    var mean: UnsafeMutablePointer<Double>!
    var invStd: UnsafeMutablePointer<Double>!
    var sums: UnsafeMutablePointer<Double>!
    /// Values behind the batch statistics of the last training forward (all parts and ranks).
    var statisticsCount = 0
    /// The ReLU that follows this layer is applied here, as the output is written (see Network).
    var fusesReLU = false

    init(node: Node, capacity: Int, eps: Double, momentum: Double, reducer: StatisticsReducer?) {
        self.eps = eps
        self.momentum = momentum
        self.reducer = reducer
        super.init(node: node, capacity: capacity)
        let ch = node.inputShapes[0].channels
        xhat = own(allocateZeroed(T.self, count: capacity * inShape.count))
        mean = own(allocateZeroed(Double.self, count: ch))
        invStd = own(allocateZeroed(Double.self, count: ch))
        sums = own(allocateZeroed(Double.self, count: 2 * ch + 1))
    }

    override var reducesAcrossParts: Bool { true }

    override func forward(_ c: PassContext) {
        let ch = inShape.channels, plane = inShape.plane
        let gamma = w!, beta = w + ch
        if !c.training {
            for k in 0..<ch {
                mean[k] = Double(stats[k])
                invStd[k] = 1 / (Double(stats[ch + k]) + eps).squareRoot()
            }
            batchNormApply(y0(c), xhat: nil, x0(c), mean: mean, invStd: invStd, gamma: gamma, beta: beta, n: c.count, channels: ch, plane: plane,
                           relu: fusesReLU)
            return
        }
        // This part's sums S, and its squared deviations around its own mean (a second local pass,
        // stabler than summing x^2 in Float), moved to a shift a: Q = deviations + count * (local
        // mean - a)^2. One sum over every part (and rank, with sync_bn) of [S, Q, count] gives the
        // mean S / M and the variance Q / M - (mean - a)^2 (Chan et al.'s parallel variance): the
        // parts meet once per forward instead of twice. The shift is the running mean, the same on
        // every part and rank and near the batch mean once training runs, so that little cancels;
        // a part alone shifts by its own mean, which makes the variance its exact two-pass value.
        channelSums(sums, x0(c), n: c.count, channels: ch, plane: plane)
        let local = Double(c.count * plane)
        for k in 0..<ch { mean[k] = local > 0 ? sums[k] / local : 0 }
        channelSquaredDeviations(sums + ch, x0(c), mean: mean, n: c.count, channels: ch, plane: plane)
        let combines = reducer?.combines ?? false
        let shift = invStd!   // free until the variance is known
        for k in 0..<ch {
            // (A non-finite running mean, e.g. from a checkpoint of a run that blew up, shifts by 0.)
            let running = Double(stats[k])
            shift[k] = combines ? (running.isFinite ? running : 0) : mean[k]
            let d = mean[k] - shift[k]
            sums[ch + k] += local * d * d
        }
        sums[2 * ch] = local
        if combines { reducer!.sum(sums, count: 2 * ch + 1, part: c.part) }
        let m = sums[2 * ch]
        statisticsCount = Int(m)
        for k in 0..<ch {
            mean[k] = m > 0 ? sums[k] / m : 0
            let d = mean[k] - shift[k]
            let variance = m > 0 ? max(0, sums[ch + k] / m - d * d) : 0
            invStd[k] = 1 / (variance + eps).squareRoot()
            if c.updateStatistics && c.part == 0 {
                // Running averages (PyTorch's momentum convention), variance unbiased: var * M/(M-1).
                let unbiased = m > 1 ? variance * m / (m - 1) : variance
                stats[k] = T((1 - momentum) * Double(stats[k]) + momentum * mean[k])
                stats[ch + k] = T((1 - momentum) * Double(stats[ch + k]) + momentum * unbiased)
            }
        }
        batchNormApply(y0(c), xhat: xhat, x0(c), mean: mean, invStd: invStd, gamma: gamma, beta: beta, n: c.count, channels: ch, plane: plane,
                       relu: fusesReLU)
    }

    override func backward(_ c: PassContext) {
        let ch = inShape.channels, plane = inShape.plane
        batchNormGradientSums(sums, dy0(c), xhat: xhat, n: c.count, channels: ch, plane: plane)
        // Parameter gradients from this part's samples only: summing parts (and ranks) gives the total.
        for k in 0..<ch {
            dw[ch + k] += T(sums[k])
            dw[k] += T(sums[ch + k])
        }
        reducer?.sum(sums, count: 2 * ch, part: c.part)
        guard let d = dx0(c) else { return }
        batchNormInputGradient(d, dy0(c), xhat: xhat, gamma: w, invStd: invStd, sums: sums, count: statisticsCount, n: c.count, channels: ch, plane: plane)
    }
}

// MARK: - Fully connected

final class LinearLayer<T: Scalar>: Layer<T> {
    let outFeatures: Int
    let hasBias: Bool
    init(node: Node, capacity: Int, outFeatures: Int, bias: Bool) {
        self.outFeatures = outFeatures
        hasBias = bias
        super.init(node: node, capacity: capacity)
    }
    override func forward(_ c: PassContext) {
        linearForward(y0(c), x0(c), weight: w, bias: hasBias ? w + outFeatures * inShape.count : nil, n: c.count, inFeatures: inShape.count, outFeatures: outFeatures)
    }
    /// Deferred weight gradients (`Network.deferWeightGradients`): the step's inputs and output
    /// gradients, one row per sample of every chunk, for one product at the last chunk.
    var stashX: UnsafeMutablePointer<T>?
    var stashDY: UnsafeMutablePointer<T>?
    var stashRows = 0
    override func backward(_ c: PassContext) {
        let inF = inShape.count
        // In chunks, the weight gradient of each small chunk would read and write all of dW (and pack the
        // operands) once per chunk: the rows go to the stash instead, and the last chunk makes one
        // product of the step's rows (a step that is one chunk goes straight through).
        guard let sx = stashX, let sdy = stashDY, c.stashRow >= 0, !(c.stashRow == 0 && c.lastChunk) else {
            linearBackward(dx0(c), dWeight: dw, dBias: hasBias ? dw + outFeatures * inF : nil, dy0(c), x: x0(c), weight: w,
                           n: c.count, inFeatures: inF, outFeatures: outFeatures)
            return
        }
        precondition(c.stashRow + c.count <= stashRows, "layer '\(node.name)': \(c.stashRow + c.count) samples in a step exceed the stash of \(stashRows)")
        (sx + c.stashRow * inF).update(from: x0(c), count: c.count * inF)
        (sdy + c.stashRow * outFeatures).update(from: dy0(c), count: c.count * outFeatures)
        if let dx = dx0(c) { linearInputGradient(dx, dy0(c), weight: w, n: c.count, inFeatures: inF, outFeatures: outFeatures) }
        if c.lastChunk { finishDeferred(rows: c.stashRow + c.count) }
    }
    /// The deferred weight gradients of the step's first `rows` stashed samples: at the last chunk's
    /// backward, or after it when it did not know it was the last (`Network.finishChunks`).
    func finishDeferred(rows: Int) {
        guard let sx = stashX, let sdy = stashDY, rows > 0 else { return }
        linearBackward(nil, dWeight: dw, dBias: hasBias ? dw + outFeatures * inShape.count : nil, sdy, x: sx, weight: w,
                       n: rows, inFeatures: inShape.count, outFeatures: outFeatures)
    }
}

// MARK: - Shape plumbing

final class FlattenLayer<T: Scalar>: Layer<T> {
    override func forward(_ c: PassContext) { y0(c).update(from: x0(c), count: c.count * inShape.count) }
    override func backward(_ c: PassContext) { dx0(c)?.update(from: dy0(c), count: c.count * inShape.count) }
}

final class ConcatLayer<T: Scalar>: Layer<T> {
    override func forward(_ c: PassContext) {
        let out = outShape.count
        var offset = 0
        for (i, s) in node.inputShapes.enumerated() {
            let src = x[i] + c.start * s.count
            for b in 0..<c.count { (y0(c) + b * out + offset).update(from: src + b * s.count, count: s.count) }
            offset += s.count
        }
    }
    override func backward(_ c: PassContext) {
        let out = outShape.count
        var offset = 0
        for (i, s) in node.inputShapes.enumerated() {
            if let d = dx[i] {
                let dst = d + c.start * s.count
                for b in 0..<c.count { (dst + b * s.count).update(from: dy0(c) + b * out + offset, count: s.count) }
            }
            offset += s.count
        }
    }
}

final class AddLayer<T: Scalar>: Layer<T> {
    override func forward(_ c: PassContext) {
        let n = c.count * outShape.count
        y0(c).update(from: x[0] + c.start * outShape.count, count: n)
        for i in 1..<x.count { accumulate(y0(c), x[i] + c.start * outShape.count, count: n) }
    }
    override func backward(_ c: PassContext) {
        let n = c.count * outShape.count
        for d in dx { d.map { ($0 + c.start * outShape.count).update(from: dy0(c), count: n) } }
    }
}

// MARK: - Towers

/// Where the towers of a split model exchange activations (allgather forward, reduce-scatter
/// backward). Implemented over the tower group's communicator; counts what it moves.
public protocol TowerExchange: AnyObject {
    /// Each tower contributes `bytes`; `receive` then holds towers * bytes in tower order.
    func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer)
    /// `send` holds towers * count floats; this tower receives the sum over towers of its block.
    func reduceScatter(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, count: Int)
}

final class TowerGatherLayer<T: Scalar>: Layer<T> {
    let tower: Int
    let slices: [Int]
    let offsets: [Int]
    let widest: Int
    let sumGradients: Bool
    unowned let exchange: TowerExchange
    var send: UnsafeMutablePointer<T>!
    var receive: UnsafeMutablePointer<T>!

    init(node: Node, capacity: Int, tower: Int, slices: [Int], sumGradients: Bool, exchange: TowerExchange) {
        self.tower = tower
        self.slices = slices
        var o: [Int] = [], acc = 0
        for s in slices { o.append(acc); acc += s }
        offsets = o
        widest = slices.max() ?? 0
        self.sumGradients = sumGradients
        self.exchange = exchange
        super.init(node: node, capacity: capacity)
        let block = capacity * widest * node.outputShape.plane
        send = own(allocateZeroed(T.self, count: slices.count * block))
        receive = own(allocateZeroed(T.self, count: slices.count * block))
    }

    override func forward(_ c: PassContext) {
        // Blocks are padded to the widest slice so that every tower sends the same number of bytes.
        let plane = outShape.plane, n = c.count
        let block = n * widest * plane
        send.update(from: x0(c), count: n * slices[tower] * plane)
        exchange.allgather(send, bytes: block * MemoryLayout<T>.stride, into: receive)
        let y = y0(c), out = outShape.count
        for u in 0..<slices.count {
            let width = slices[u] * plane
            let src = receive + u * block
            for b in 0..<n { (y + b * out + offsets[u] * plane).update(from: src + b * width, count: width) }
        }
    }

    override func backward(_ c: PassContext) {
        guard let d = dx0(c) else { return }
        let plane = outShape.plane, n = c.count, out = outShape.count
        let dy = dy0(c)
        let mine = slices[tower] * plane
        if !sumGradients {
            // Every tower computed the same whole gradient (the loss sees all logits): keep our slice.
            for b in 0..<n { (d + b * mine).update(from: dy + b * out + offsets[tower] * plane, count: mine) }
            return
        }
        let block = n * widest * plane
        for u in 0..<slices.count {
            let width = slices[u] * plane
            let dst = send + u * block
            for b in 0..<n { (dst + b * width).update(from: dy + b * out + offsets[u] * plane, count: width) }
        }
        precondition(T.self == Float.self, "towers exchange Float32 gradients")
        send.withMemoryRebound(to: Float.self, capacity: slices.count * block) { s in
            receive.withMemoryRebound(to: Float.self, capacity: block) { r in exchange.reduceScatter(s, into: r, count: block) }
        }
        d.update(from: receive, count: n * mine)
    }
}
