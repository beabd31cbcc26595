"""The published CIFAR-10 DDPM on a CUDA GPU: training, forgetting and sampling speed.

UNet with 128 channels, multipliers 1, 2, 2, 2, two ResNet blocks per level, attention at
16x16, T = 1000 (as in the Selective Amnesia code), random weights on random 32x32 data (no
download needed). Reports training steps/s at batch 128, SA forgetting steps/s (surrogate +
replay batches of 128 and the EWC term), sampling images/s with the official guidance (w = 3)
for 50 DDIM steps and for the 1000-step ancestral sampler of the paper's evaluation, the
diffusion Fisher (all 1000 timesteps, as published) in samples/s, and peak memory.
Runs in well under 8 minutes; exits with a message when CUDA is absent.

    .venv/bin/python benchmarks/gpu_ddpm.py [--seconds 60]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def timed_steps(step, seconds: float, warmup: int = 3) -> float:
    """Run ``step()`` for about ``seconds`` after a warm-up; return steps per second."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 5 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="timing window per part")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_ddpm: CUDA is not available on this machine; nothing to measure.")
        return 0
    from sa_kit.chapters.ddpm_digits import make_ddpm
    from sa_kit.diffusion_fisher import diffusion_fisher
    from sa_kit.forget import forget_one_class
    from sa_kit.profiles import DDPMSizes

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev, b = "cuda", args.batch
    model = make_ddpm(DDPMSizes()).to(dev)                     # the published configuration
    print(f"{torch.cuda.get_device_name()}: UNet {sum(p.numel() for p in model.parameters()):,}"
          " parameters (ch 128, mult 1,2,2,2, attention at 16), random weights and data")
    x, y = torch.rand(b, 3, 32, 32, device=dev), torch.randint(0, 10, (b,), device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)

    def train_step() -> None:
        loss = model.neg_elbo(x, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    train = timed_steps(train_step, args.seconds)
    print(f"training:   {train:6.2f} steps/s at batch {b} "
          f"(peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)", flush=True)
    fisher = {k: torch.rand_like(p) for k, p in model.named_parameters() if p.requires_grad}
    steps = max(10, int(train * args.seconds / 2))             # about seconds of forgetting
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    hist = forget_one_class(model, 0, fisher=fisher, mapping="noise", lmbda=10.0, gamma=1.0,
                        steps=steps, batch_size=b, lr=1e-4, grad_clip=1.0, replay_buffer=b,
                        progress=False)
    forget_s = len(hist["step"]) / (hist["seconds"][-1])
    print(f"forgetting: {forget_s:6.2f} steps/s at batch {b}+{b} with EWC "
          f"(run incl. replay buffer {time.perf_counter() - t0:.0f} s; peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)", flush=True)
    torch.cuda.reset_peak_memory_stats()
    c = torch.arange(256, device=dev) % 10
    model.sample(c[:16], num_inference_steps=5)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.sample(c, guidance_scale=3.0, num_inference_steps=50, eta=0.0)
    torch.cuda.synchronize()
    print(f"sampling:   {len(c) / (time.perf_counter() - t0):6.1f} images/s (DDIM 50 steps, "
          f"w = 3, batch {len(c)}; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)",
          flush=True)
    t0 = time.perf_counter()
    model.sample(c[:64], guidance_scale=3.0, num_inference_steps=1000, eta=1.0)
    torch.cuda.synchronize()
    print(f"sampling:   {64 / (time.perf_counter() - t0):6.1f} images/s (ancestral, 1000 steps, "
          "w = 3, batch 64: the paper's evaluation sampler)", flush=True)
    xs, cs = model.sample(c[:4], num_inference_steps=20), c[:4]
    t0 = time.perf_counter()
    diffusion_fisher(model, xs, cs, None, chunk_size=250, progress=False)
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 4
    print(f"Fisher:     {per:6.2f} s per sample over all 1000 timesteps (published: 5000 "
          f"samples -> {5000 * per / 3600:.1f} h on this GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
