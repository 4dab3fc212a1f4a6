"""Train your own network with MLAAN from Python: a stem, blocks and a head, in your own loop.

python examples/own_model.py   (CPU, the CIFAR-10 subset bundled with fastlocal, about half a minute)
"""

import torch
from torch import nn

import fastlocal
from fastlocal.config import DataConfig
from fastlocal.data import build_data


def conv_block(c_in, c_out, stride=1):  # any nn.Module works as a block; this one is a plain conv-BN-ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


torch.manual_seed(0)
stem = conv_block(3, 16)
blocks = [conv_block(16, 16), conv_block(16, 32, 2), conv_block(32, 32), conv_block(32, 64, 2), conv_block(64, 64)]
head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
backbone = fastlocal.Backbone(stem, blocks, None, head, input_size=32)

data = build_data(
    DataConfig(source="bundled", max_train=1500, max_test=500),
    batch_size=64,
    eval_batch_size=500,
    device=torch.device("cpu"),
    seed=0,
    progress=False,
)
learner = fastlocal.LocalLearner(backbone, "mlaan", num_modules=3, mean=data.info.mean, std=data.info.std)
optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
for epoch in range(3):
    learner.train()
    for x, y in data.train:
        optimizer.zero_grad()
        loss = learner.step(x, y)  # local forward/backward of the batch: fills .grad, moves the EMA copies
        optimizer.step()
    learner.eval()
    with torch.no_grad():  # evaluation is the plain forward of the backbone
        correct = sum((learner(x).argmax(1) == y).sum().item() for x, y in data.test)
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {100 * correct / data.test.num_images:.1f}%")
