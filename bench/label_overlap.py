#!/usr/bin/env python3
"""Do the model and the JPEG decode overlap on one GPU, or take turns? (issue 15)

A diagnostic, not a figure of `label` itself. On one GPU, for a few seconds each:

1. the teacher alone: a CUDA graph of the model (fp16 weights, batch B) replayed on a stream of
   its own, in a loop on one thread -> model img/s;
2. the decode alone: batches of B JPEGs decoded on a second thread and stream, on the hardware
   engines (nvImageCodec) and, separately, with nvJPEG on the SMs (torchvision) -> decode img/s;
3. both at once, on two threads -> both rates again. If they overlapped, each would keep most of
   its rate alone; if they take turns, the fractions of the alone rates add up to ~1.
4. with ``--profile``, the same concurrent run under ``torch.profiler`` (CPU + CUDA
   activities): the CUDA runtime calls made (synchronizations, allocations) and their total time.

Each decoder runs on a stream of default priority and on one of the highest priority (as
label's producer does: ``inference.producer_stream``).

Usage (on the GPU machine)::

    python bench/label_overlap.py --model vit_base_patch16_224 --batch 256 --seconds 4
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image


def jpegs(n: int, w: int = 640, h: int = 480, unique: int = 64) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients + noise), ``unique`` distinct ones repeated."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(unique):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 7) % 256, ((xx + yy) // 2) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % unique] for i in range(n)]


def model_loop(model_name: str, batch: int, device: torch.device):
    """(step, rate_fn): one CUDA-graph replay of the model per step, on its own stream."""
    import timm

    model = timm.create_model(model_name, pretrained=False).to(device).eval().half()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.half).contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            model(x)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = model(x)
    stream.synchronize()

    def step() -> None:
        with torch.cuda.stream(stream):
            graph.replay()
            y.float().softmax(-1).topk(5)
        stream.synchronize()

    return step


def green_model_loop(model_name: str, batch: int, device: torch.device, num_sms: int):
    """The model, eagerly, on a CUDA green context of ``num_sms`` SMs (the rest of the GPU left
    to the decode), or None when this torch/driver has no green contexts."""
    import timm

    try:
        from torch.cuda import green_contexts as gcs

        G = gcs.GreenContext
        try:
            ctx = G(num_sms=num_sms, device_id=device.index or 0)
        except TypeError:
            ctx = G.create(num_sms=num_sms, device_id=device.index or 0)
    except Exception as e:  # noqa: BLE001 - a diagnostic: say why and go on
        print(f"green context of {num_sms} SMs: not available ({type(e).__name__}: {e})")
        return None
    model = timm.create_model(model_name, pretrained=False).to(device).eval().half()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.half).contiguous(memory_format=torch.channels_last)
    local = threading.local()

    def step() -> None:
        if not getattr(local, "stream", None):
            if hasattr(ctx, "Stream"):
                local.stream = ctx.Stream()
            else:  # torch 2.10/2.11: the context is current on this thread; its default stream
                ctx.set_context()
                local.stream = torch.cuda.default_stream(device)
        with torch.cuda.stream(local.stream), torch.inference_mode():
            model(x).float().softmax(-1).topk(5)
        local.stream.synchronize()

    return step


def decode_loop(kind: str, blobs: list[bytes], batch: int, device: torch.device, high: bool = False):
    """(step): decode one batch of ``blobs`` per step on a stream of its own (``high``: the
    highest priority, as label's producer runs), or None when ``kind`` is not available."""
    from silverlabel.inference import producer_stream

    stream = producer_stream(device) if high else torch.cuda.Stream(device)
    batches = [blobs[i:i + batch] for i in range(0, len(blobs) - batch + 1, batch)]
    state = {"i": 0}
    if kind == "engines":
        from silverlabel.inference import hardware_jpeg_decoder

        hw = hardware_jpeg_decoder(device.index or 0)
        if hw is None:
            return None
        nvimgcodec, dec, params = hw

        def step() -> None:
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            with torch.cuda.stream(stream):
                imgs = dec.decode([nvimgcodec.CodeStream(x) for x in b], params=params, cuda_stream=stream.cuda_stream)
                assert all(im is not None for im in imgs)
            stream.synchronize()
    else:
        from torchvision.io import decode_jpeg

        tensors = [[torch.frombuffer(x, dtype=torch.uint8) for x in b] for b in batches]

        def step() -> None:
            b = tensors[state["i"] % len(tensors)]
            state["i"] += 1
            with torch.cuda.stream(stream):
                decode_jpeg(b, device=device)
            stream.synchronize()

    return step


def run_for(steps: dict, seconds: float) -> dict[str, float]:
    """Run each step function on its own thread for ``seconds``; steps per second each."""
    stop = threading.Event()
    counts: Counter = Counter()

    def loop(name, fn):
        while not stop.is_set():
            fn()
            counts[name] += 1

    for fn in steps.values():  # warm-up
        fn()
    threads = [threading.Thread(target=loop, args=(n, f)) for n, f in steps.items()]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return {n: counts[n] / dt for n in steps}


def runtime_calls(steps: dict, seconds: float) -> list[tuple[str, int, float]]:
    """CUDA runtime/driver calls during a concurrent run: (name, count, total ms), biggest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_for(steps, seconds)
    rows = []
    for ev in prof.key_averages():
        name = ev.key
        if name.startswith(("cuda", "cu")) and not name.startswith("cutlass"):
            rows.append((name, ev.count, ev.cpu_time_total / 1e3))
    return sorted(rows, key=lambda r: -r[2])[:15]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--reserve-sms", type=int, nargs="*", default=[8, 16, 32],
                    help="also run the model on a green context of all SMs but these many")
    ap.add_argument("--profile", action="store_true", help="list the CUDA runtime calls of each concurrent run")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    blobs = jpegs(args.images)
    model = model_loop(args.model, args.batch, device)
    B = args.batch
    print(f"model {args.model}, batch {B}, GPU {torch.cuda.get_device_name(device)}")
    alone_m = run_for({"model": model}, args.seconds)["model"] * B
    print(f"model alone: {alone_m:,.0f} img/s")
    for kind, high in (("engines", False), ("nvjpeg", False), ("engines", True), ("nvjpeg", True)):
        dec = decode_loop(kind, blobs, B, device, high)
        if dec is None:
            print(f"{kind}: not available")
            continue
        kind = f"{kind}, {'high' if high else 'default'} priority"
        alone_d = run_for({"decode": dec}, args.seconds)["decode"] * B
        both = run_for({"model": model, "decode": dec}, args.seconds)
        m, d = both["model"] * B, both["decode"] * B
        print(f"{kind}: decode alone {alone_d:,.0f} img/s; together model {m:,.0f} ({m / alone_m:.0%}) "
              f"+ decode {d:,.0f} ({d / alone_d:.0%}) = {m / alone_m + d / alone_d:.2f} of the alone rates")
        if args.profile:
            for name, count, ms in runtime_calls({"model": model, "decode": dec}, min(args.seconds, 2.0)):
                print(f"    {name:<40} {count:>7} calls {ms:>10.1f} ms")
    dec = decode_loop("engines", blobs, B, device, True)
    spin_stream = torch.cuda.Stream(device)

    def spin() -> None:  # one block spinning ~5 ms: the GPU busy on one SM, host thread waiting
        with torch.cuda.stream(spin_stream):
            torch.cuda._sleep(10_000_000)
        spin_stream.synchronize()

    def host_wait() -> None:  # no GPU work at all: a second Python thread that sleeps
        time.sleep(0.005)

    if dec is not None:
        alone_d = run_for({"decode": dec}, args.seconds)["decode"] * B
        for name, fn in (("one spinning block on one SM", spin), ("a sleeping host thread", host_wait)):
            d = run_for({"other": fn, "decode": dec}, args.seconds)["decode"] * B
            print(f"engines decode next to {name}: {d:,.0f} img/s ({d / alone_d:.0%} of {alone_d:,.0f} alone)")
    for reserve in args.reserve_sms:
        total = torch.cuda.get_device_properties(device).multi_processor_count
        green = green_model_loop(args.model, B, device, total - reserve)
        if green is None or dec is None:
            continue
        try:
            alone_g = run_for({"model": green}, args.seconds)["model"] * B
            both = run_for({"model": green, "decode": dec}, args.seconds)
        except Exception as e:  # noqa: BLE001
            print(f"green context, {reserve} SMs left to decode: failed ({type(e).__name__}: {e})")
            continue
        m, d = both["model"] * B, both["decode"] * B
        print(f"model on {total - reserve} of {total} SMs (green context, eager): alone {alone_g:,.0f} img/s; "
              f"with engines decode: model {m:,.0f} + decode {d:,.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
