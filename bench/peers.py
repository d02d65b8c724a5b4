"""The `module` peers of `gen bench`: each benchmarked model written the ordinary
way, as `nn.Module`s trained with `torch.optim`, the way pytorch/examples
writes them (vae/main.py, dcgan/main.py) and the usual WGAN-GP scripts do.

They are the reference the compiled pure steps are measured against, not
part of the library. Each peer has `step(batch)`: zero_grad, forward,
backward, optimizer.step, with the noise drawn inside (randn/randn_like) as
those scripts do, and data in the same layout gen's step receives (images in
[0, 1], a WGAN-GP step's n_critic real batches stacked on a leading axis).

`GEN_NAMES` maps each peer's `state_dict` names to gen's parameter names, so
tests/test_bench.py can load gen's weights into a peer and check that both
compute the same loss: the proof that a peer is the same architecture and
objective.
"""

import torch
import torch.nn.functional as F
from torch import nn, optim

# --- VAE (pytorch/examples vae/main.py) -------------------------------------------------


class VAE(nn.Module):
    def __init__(self, input_dim=784, hidden_dim=400, latent_dim=20):
        super().__init__()
        self.input_dim = input_dim
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, latent_dim)
        self.fc22 = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar, eps=None):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std) if eps is None else eps  # eps given only by parity tests
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x, eps=None):
        mu, logvar = self.encode(x.view(-1, self.input_dim))
        z = self.reparameterize(mu, logvar, eps)
        return self.decode(z), mu, logvar


class ConvVAE(nn.Module):
    """gen/vae.py's conv_init/conv_encode/conv_decode as a module."""

    def __init__(self, channels=1, size=28, hidden_dim=256, latent_dim=20):
        super().__init__()
        self.base = size // 4
        flat = 64 * self.base * self.base
        self.conv1 = nn.Conv2d(channels, 32, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(flat, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, latent_dim)
        self.fc22 = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, flat)
        self.deconv1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.deconv2 = nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1)

    def encode(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.fc1(h.flatten(1)))
        return self.fc21(h), self.fc22(h)

    reparameterize = VAE.reparameterize

    def decode(self, z):
        h = F.relu(self.fc3(z))
        h = F.relu(self.fc4(h)).view(-1, 64, self.base, self.base)
        h = F.relu(self.deconv1(h))
        return torch.sigmoid(self.deconv2(h))

    def forward(self, x, eps=None):
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.decode(z), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    """pytorch/examples' loss_function: summed BCE + KL over the batch."""
    BCE = F.binary_cross_entropy(recon_x, x.view_as(recon_x), reduction='sum')
    # see Appendix B from VAE paper: Kingma and Welling. Auto-Encoding Variational Bayes. ICLR, 2014
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


class VAEPeer:
    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999)):
        self.model = model
        self.optimizer = optim.Adam(model.parameters(), lr=lr, betas=betas)

    def step(self, batch, eps=None):
        self.model.train()
        self.optimizer.zero_grad()
        recon_batch, mu, logvar = self.model(batch, eps)
        loss = vae_loss(recon_batch, batch, mu, logvar)
        loss.backward()
        self.optimizer.step()
        return loss  # summed over the batch, as pytorch/examples reports it


VAE_NAMES = {"fc1": "encoder.hidden", "fc21": "encoder.mean", "fc22": "encoder.log_variance",
             "fc3": "decoder.hidden", "fc4": "decoder.output"}
CONV_VAE_NAMES = {"conv1": "encoder.conv1", "conv2": "encoder.conv2", "fc1": "encoder.hidden",
                  "fc21": "encoder.mean", "fc22": "encoder.log_variance", "fc3": "decoder.hidden",
                  "fc4": "decoder.expand", "deconv1": "decoder.deconv1", "deconv2": "decoder.deconv2"}

# --- DCGAN (pytorch/examples dcgan/main.py, in the 28x28 two-layer form of gen/dcgan.py) ---------


def weights_init(m):
    classname = m.__class__.__name__
    if classname.find('Conv') != -1 or classname.find('Linear') != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    elif classname.find('BatchNorm') != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=1, size=28):
        super().__init__()
        self.base = size // 4
        self.ngf = ngf
        self.project = nn.Sequential(
            nn.Linear(nz, 2 * ngf * self.base * self.base, bias=False),
            nn.BatchNorm1d(2 * ngf * self.base * self.base),
            nn.ReLU(True),
        )
        self.main = nn.Sequential(
            # state size. (ngf*2) x 7 x 7
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            # state size. (ngf) x 14 x 14
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1),
            nn.Tanh(),
            # state size. (nc) x 28 x 28
        )

    def forward(self, input):
        h = self.project(input).view(-1, self.ngf * 2, self.base, self.base)
        return self.main(h)


class DCGANDiscriminator(nn.Module):
    def __init__(self, ndf=64, nc=1, size=28):
        super().__init__()
        base = size // 4
        self.main = nn.Sequential(
            # input is (nc) x 28 x 28
            nn.Conv2d(nc, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 14 x 14
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 7 x 7
        )
        self.output = nn.Linear(ndf * 2 * base * base, 1)

    def forward(self, input):
        return self.output(self.main(input).flatten(1)).view(-1)  # logits: BCEWithLogits below


DCGAN_GENERATOR_NAMES = {"project.0": "project", "project.1": "project_norm", "main.0": "deconv1",
                         "main.1": "deconv1_norm", "main.3": "deconv2"}
DCGAN_DISCRIMINATOR_NAMES = {"main.0": "conv1", "main.2": "conv2", "main.3": "conv2_norm", "output": "output"}

# --- MLP GAN and WGAN-GP on 2D points -----------------------------------------------------


def mlp(sizes, activation):
    """Linear → activation between every pair of sizes, no activation after the last."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def mlp_generator(latent_dim, hidden_dim, depth, data_dim):
    return mlp([latent_dim] + [hidden_dim] * depth + [data_dim], nn.ReLU)


def mlp_discriminator(data_dim, hidden_dim, depth):
    return mlp([data_dim] + [hidden_dim] * depth + [1], lambda: nn.LeakyReLU(0.2))


def mlp_names(depth):
    """Sequential indices (Linear every second entry) → gen's hidden1..hiddenN, output."""
    return {str(2 * i): f"hidden{i + 1}" for i in range(depth)} | {str(2 * depth): "output"}


class GANPeer:
    """pytorch/examples dcgan/main.py's training step: D on real (label 1) and on
    fake.detach() (label 0), then G on D(fake) with label 1; BCEWithLogits on logits.
    Images arrive in [0, 1] and are mapped to tanh's [-1, 1], as gen's step does."""

    def __init__(self, netG, netD, latent_dim, lr, betas, images):
        self.netG, self.netD, self.nz, self.images = netG, netD, latent_dim, images
        self.criterion = nn.BCEWithLogitsLoss()
        self.optimizerD = optim.Adam(netD.parameters(), lr=lr, betas=betas)
        self.optimizerG = optim.Adam(netG.parameters(), lr=lr, betas=betas)

    def step(self, batch, noise=None):
        real = batch * 2 - 1 if self.images else batch
        b_size = real.size(0)
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        self.netD.zero_grad()
        label = torch.full((b_size,), 1.0, device=real.device)
        output = self.netD(real).view(-1)
        errD_real = self.criterion(output, label)
        errD_real.backward()
        noise = torch.randn(b_size, self.nz, device=real.device) if noise is None else noise
        fake = self.netG(noise)
        label.fill_(0.0)
        output = self.netD(fake.detach()).view(-1)
        errD_fake = self.criterion(output, label)
        errD_fake.backward()
        errD = errD_real + errD_fake
        self.optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        self.netG.zero_grad()
        label.fill_(1.0)  # fake labels are real for generator cost
        output = self.netD(fake).view(-1)
        errG = self.criterion(output, label)
        errG.backward()
        self.optimizerG.step()
        return errD, errG


class WGANGPPeer:
    """Gulrajani et al. 2017, Algorithm 1, written the usual way: n_critic critic
    updates, each with a gradient penalty from torch.autograd.grad(create_graph=True),
    then one generator update. `batch` is (n_critic, B, ...)."""

    def __init__(self, netG, netD, latent_dim, lr, betas, n_critic, gp_weight, shape):
        self.netG, self.netD, self.nz, self.shape = netG, netD, latent_dim, shape
        self.n_critic, self.gp_weight = n_critic, gp_weight
        self.optimizerD = optim.Adam(netD.parameters(), lr=lr, betas=betas)
        self.optimizerG = optim.Adam(netG.parameters(), lr=lr, betas=betas)

    def gradient_penalty(self, real, fake, alpha=None):
        alpha = torch.rand(real.size(0), 1, device=real.device) if alpha is None else alpha.view(-1, 1)
        interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        disc_interpolates = self.netD(interpolates)
        gradients = torch.autograd.grad(outputs=disc_interpolates, inputs=interpolates,
                                        grad_outputs=torch.ones_like(disc_interpolates),
                                        create_graph=True, retain_graph=True, only_inputs=True)[0]
        return ((gradients.norm(2, dim=1) - 1) ** 2).mean()

    def step(self, batch, noise=None):
        """noise (parity tests only): {"z_discriminator", "z_generator", "epsilon"} as gen draws them."""
        batch = batch.view(self.n_critic, -1, *self.shape)  # (B, ...) when n_critic is 1
        for k in range(self.n_critic):
            real = batch[k]
            self.netD.zero_grad()
            z = torch.randn(real.size(0), self.nz, device=real.device) if noise is None else noise["z_discriminator"][k]
            fake = self.netG(z).detach()
            alpha = None if noise is None else noise["epsilon"][k]
            errD = (self.netD(fake).mean() - self.netD(real).mean()
                    + self.gp_weight * self.gradient_penalty(real, fake, alpha))
            errD.backward()
            self.optimizerD.step()
        self.netG.zero_grad()
        z = torch.randn(batch.size(1), self.nz, device=batch.device) if noise is None else noise["z_generator"]
        errG = -self.netD(self.netG(z)).mean()
        errG.backward()
        self.optimizerG.step()
        return errD, errG


# --- building a peer from gen's config ---------------------------------------------------


def build(model: str, config, shape: tuple, device):
    """The peer for a `gen bench` model name, sized and tuned from gen's resolved Config."""
    betas = (config.b1, config.b2)
    if model == "vae":
        return VAEPeer(VAE(shape_size(shape), config.hidden_dim, config.latent_dim).to(device), config.lr, betas)
    if model == "conv-vae":
        net = ConvVAE(shape[0], shape[1], config.hidden_dim, config.latent_dim).to(device)
        return VAEPeer(net, config.lr, betas)
    if model == "dcgan":
        netG = DCGANGenerator(config.latent_dim, nc=shape[0], size=shape[1]).to(device)
        netD = DCGANDiscriminator(nc=shape[0], size=shape[1]).to(device)
        netG.apply(weights_init)
        netD.apply(weights_init)
        return GANPeer(netG, netD, config.latent_dim, config.lr, betas, images=True)
    depth = mlp_depth()
    netG = mlp_generator(config.latent_dim, config.hidden_dim, depth, shape_size(shape)).to(device)
    netD = mlp_discriminator(shape_size(shape), config.hidden_dim, depth).to(device)
    if model == "gan-2d":
        return GANPeer(netG, netD, config.latent_dim, config.lr, betas, images=False)
    if model == "wgan-gp":
        return WGANGPPeer(netG, netD, config.latent_dim, config.lr, betas, config.n_critic, config.gp_weight, shape)
    raise ValueError(f"no module peer for '{model}'")


def mlp_depth() -> int:
    """Hidden layers in gen's MLP GANs (gen/gan.py's MLP_DEPTH), so both sides stay the same size."""
    from gen import gan
    return gan.MLP_DEPTH


def shape_size(shape: tuple) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def load_gen_weights(module: nn.Module, tensors: dict, names: dict) -> None:
    """Copy gen's params (and batch-norm running statistics) into a peer module.

    `names` maps the module's layer prefixes to gen's (`GEN_NAMES`-style);
    `tensors` holds gen's names, e.g. {"encoder.hidden.weight": ...}. Only
    num_batches_tracked, which gen does not keep, may be left unloaded."""
    state = {}
    for key in module.state_dict():
        prefix, leaf = key.rsplit(".", 1)
        gen_key = f"{names[prefix]}.{leaf}"
        if gen_key in tensors:
            state[key] = tensors[gen_key]
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing) and not unexpected, (missing, unexpected)
