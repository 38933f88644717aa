// The default experiment, built into the executable so that `trainer` runs from any folder.
// It is configs/lenet5-bn.yaml verbatim (a test checks that the two agree).

extension TrainConfig {
    public static let defaultName = "lenet5-bn"
    public static let defaultText = #"""
# LeNet-5 with batch normalisation: Tandem's default model (trainer with no arguments runs it).
# Layer for layer the LeNet5BN of ../shared/peers/models.py: BN (eps 1e-5, momentum 0.1) before
# each ReLU, no bias on the layers BN follows. 61,932 parameters + 452 running statistics.
model:
  init: pytorch
  loss: softmax_cross_entropy
  layers:
    - {name: conv1, type: conv, out: 6, kernel: 5, pad: 2, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: pool1, type: maxpool, kernel: 2, stride: 2}
    - {name: conv2, type: conv, out: 16, kernel: 5, bias: false}
    - {name: bn2, type: batchnorm}
    - {name: relu2, type: relu}
    - {name: pool2, type: maxpool, kernel: 2, stride: 2}
    - {name: flatten, type: flatten}
    - {name: fc1, type: linear, out: 120, bias: false}
    - {name: bn3, type: batchnorm}
    - {name: relu3, type: relu}
    - {name: fc2, type: linear, out: 84, bias: false}
    - {name: bn4, type: batchnorm}
    - {name: relu4, type: relu}
    - {name: fc3, type: linear, out: 10}
data:
  format: idx
  path: /usr/share/datasets/fashion-mnist
train:
  epochs: 8
  batch_size: 64
  seed: 1
  eval_every_epochs: 1
optimizer:
  type: sgd
  lr: 0.05
  momentum: 0.9
  weight_decay: 0.0005
  schedule: {type: cosine, min_lr: 0.0005}
parallel:
  threads: auto

"""#

    public static func builtInDefault() throws -> TrainConfig {
        try parse(defaultText, source: "configs/lenet5-bn.yaml (built in)")
    }
}
