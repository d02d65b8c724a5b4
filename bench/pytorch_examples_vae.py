"""The pytorch/examples VAE (vae/main.py), trained the way that script trains it,
on data loaded by gen (no torchvision): the reference gen's VAE is measured against.

    python bench/pytorch_examples_vae.py --data fashion-mnist --epochs 10

Same model (784-400-20, ReLU, sigmoid + summed BCE + KL), Adam(1e-3), batch
128, shuffled DataLoader with its ragged last batch, and the script's test loss:
the summed loss over the test set divided by its size (nats per image).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from gen import data


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction='sum')
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", default=None, help="where the IDX files are (default: gen's search)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dataset = data.load(args.data, args.data_dir)
    train_loader = DataLoader(TensorDataset(dataset.train), batch_size=128, shuffle=True)
    test_loader = DataLoader(TensorDataset(dataset.test), batch_size=128, shuffle=False)
    model = VAE()
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for (x,) in train_loader:
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(x)
            loss = loss_function(recon_batch, x, mu, logvar)
            loss.backward()
            optimizer.step()
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for (x,) in test_loader:
                recon_batch, mu, logvar = model(x)
                test_loss += loss_function(recon_batch, x, mu, logvar).item()
        test_loss /= len(test_loader.dataset)
        print(json.dumps({"epoch": epoch, "test_loss": round(test_loss, 4),
                          "elapsed_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
