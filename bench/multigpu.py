#!/usr/bin/env python3
"""Multi-GPU runs (issue 19): label on 1 GPU and on all, DDP training over NCCL, reinforce.

A figure and a check, not a test. On a machine with N >= 2 GPUs, in one run:

1. label: a pool of ``--images`` photo-like JPEGs (bench/label.py's uniform pool, in shards
   of ``--shard-size`` so every GPU gets units), labeled by each ``--teachers`` with one
   worker and with one worker per GPU: the label tables must be identical row for row;
   images/s of each, whole run and steady state (10%..90% of the images, start-up excluded);
2. train: ``torchrun --nproc-per-node 1`` and ``N`` with the same global batch
   (``--batch-size`` is per rank; the loader gives rank ``r`` the ``r``-th slice of each
   global batch): per-step losses side by side (max relative difference; a check within
   ``--loss-rtol``, bf16 noise on a GPU), the final weights' largest difference, images/s
   (median over the second half of the steps) and its scaling (a check: >= 0.9 x N on a
   GPU); loader workers per rank are train's default (the rank's share of the cores - 1)
   unless ``--train-workers``; then the N-rank run again, one rank SIGKILLed after its
   first checkpoint, ``--resume``d to the end: its final weights must equal the
   uninterrupted run's;
3. reinforce: the training set reinforced with one worker and with one per GPU
   (``reinforce --workers`` puts worker k on GPU k, as ``label`` does): the output tars
   must be byte-identical; seconds and scaling of each.

``--device cpu`` runs the same steps on the CPU (2 workers, gloo) as a dry run of the
script (no scaling checks there). NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0),
as the lent machines need.

    python bench/multigpu.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench"), str(REPO / "tests")]

ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def log(msg: str) -> None:
    print(f"[multigpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Progress callback that notes when 10% and 90% of the images were done."""

    def __init__(self, total: int):
        self.total, self.done, self.marks = total, 0, {}

    def __call__(self, done: int, ok: int) -> None:
        self.done += done
        for f in (0.1, 0.9):
            if f not in self.marks and self.done >= f * self.total:
                self.marks[f] = time.perf_counter()

    def steady(self) -> float | None:
        if 0.1 in self.marks and 0.9 in self.marks and self.marks[0.9] > self.marks[0.1]:
            return 0.8 * self.total / (self.marks[0.9] - self.marks[0.1])
        return None


def label_table(ds: Path, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((ds / "labels" / name).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")


def teacher_spec(name: str, root: Path):
    from silverlabel.teachers import TeacherSpec

    if name == "efficientnet_lite0":
        return TeacherSpec("efficientnet_lite0")
    import timm
    from safetensors.torch import save_file

    ckpt = root / f"{name}.safetensors"  # random weights: speed and identity only
    if not ckpt.exists():
        model = timm.create_model(name, pretrained=False, num_classes=21841)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return TeacherSpec(f"timm:{name}", checkpoint=str(ckpt))


def bench_label(args, root: Path, n_gpus: int) -> list[dict]:
    from label import build_pool

    from silverlabel.stages.label import LabelConfig, run_label

    ds = build_pool(root, "uniform", args.images, args.unique, os.cpu_count() or 1, args.shard_size)
    out = []
    for name in args.teachers.split(","):
        spec = teacher_spec(name, root)
        r: dict = {"teacher": name, "images": args.images}
        for workers in (1, n_gpus):
            cfg = LabelConfig(dataset=str(ds), teachers=(spec,), device=args.device, workers=workers,
                              batch_size=args.batch, output_name=f"w{workers}-{spec.slug}", topk=50)
            clock = Clock(args.images)
            t0 = time.perf_counter()
            s = run_label(cfg, clock)
            dt = time.perf_counter() - t0
            r[f"w{workers}"] = {"seconds": dt, "rows": s.rows, "img_s": args.images / dt, "steady_img_s": clock.steady()}
            log(f"label {name} workers={workers}: {args.images / dt:.0f} img/s whole run, "
                f"{(clock.steady() or 0):.0f} steady ({dt:.1f} s)")
        one, many = label_table(ds, f"w1-{spec.slug}"), label_table(ds, f"w{n_gpus}-{spec.slug}")
        r["identical"] = one.equals(many)
        r["rows"] = one.num_rows
        a, b = r["w1"]["steady_img_s"], r[f"w{n_gpus}"]["steady_img_s"]
        r["scaling_steady"] = (b / a) if a and b else None
        r["scaling_whole"] = r[f"w{n_gpus}"]["img_s"] / r["w1"]["img_s"]
        if args.device == "cuda":
            r["scaling_ok"] = (r["scaling_steady"] or r["scaling_whole"]) >= 0.9 * n_gpus
        log(f"label {name}: identical={r['identical']} scaling steady {r['scaling_steady']} whole {r['scaling_whole']:.2f}")
        out.append(r)
    return out


def toy_trainset(root: Path, n: int, size: tuple[int, int]) -> Path:
    from toy_trainset import write_toy_trainset

    per = n // 8
    return write_toy_trainset(root / "ts", {"train": [per] * 8, "validation": [64]},
                              lambda i, s, w, h: (i % 10, {"label": i % 10}), size=size, seed=3,
                              classes={"num_classes": 10, "classes": [{"index": i, "name": f"c{i}"} for i in range(10)]})


def torchrun(nproc: int, trainset: Path, out: Path, args, extra: list[str] = (), kill_after: Path | None = None):
    """Run ``silverlabel train`` under torchrun; with ``kill_after``, SIGKILL rank 1 once that
    file exists. Returns (returncode, seconds, stderr tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "silverlabel.cli", "train", str(trainset), "-o", str(out), "--model", args.model,
           "--img-size", str(args.img_size), "--batch-size", str(args.global_batch // nproc), "--steps",
           str(args.train_steps), "--log-every", "1", "--ckpt-every", str(args.train_steps // 2), "--seed", "0",
           "--device", args.device, "--no-progress", "--no-tensorboard", *extra]
    if args.train_workers is not None:
        cmd += ["--workers", str(args.train_workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**ENV, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    killed = False
    if kill_after is not None:
        while proc.poll() is None and not killed:
            if kill_after.exists():
                ranks = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "silverlabel.cli train"],
                                       capture_output=True, text=True).stdout.split()  # torchrun's workers
                workers = sorted(int(p) for p in ranks)
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun tears the rest down
                    killed = True
            time.sleep(0.05)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, time.perf_counter() - t0, err[-3000:], killed


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint-final.pt", map_location="cpu", weights_only=True)["model"]


def weights_digest(run: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(final_weights(run).items()):
        h.update(k.encode())
        h.update(v.float().cpu().numpy().tobytes())
    return h.hexdigest()


def bench_train(args, root: Path, n_gpus: int) -> dict:
    ts = root / "ts"
    r: dict = {"global_batch": args.global_batch, "steps": args.train_steps, "model": args.model,
               "img_size": args.img_size, "train_workers": args.train_workers if args.train_workers is not None
               else "auto"}
    for name in ("run-1", f"run-{n_gpus}", "run-killed"):  # fresh runs when --out is reused
        shutil.rmtree(root / name, ignore_errors=True)
    for nproc in (1, n_gpus):
        out = root / f"run-{nproc}"
        rc, dt, err, _ = torchrun(nproc, ts, out, args)
        if rc != 0:
            log(f"torchrun {nproc} failed: {err}")
            r[f"p{nproc}"] = {"rc": rc, "stderr": err}
            r["error"] = f"torchrun --nproc-per-node {nproc} exited {rc}"
            return r
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        ips = [x.get("samples_per_s") for x in rows[len(rows) // 2:]]
        ips = [x for x in ips if x]
        r[f"p{nproc}"] = {"seconds": dt, "losses": losses(out), "img_s_median": sorted(ips)[len(ips) // 2] if ips else None,
                          "weights": weights_digest(out)}
        log(f"train nproc={nproc}: {dt:.1f} s, img/s {r[f'p{nproc}']['img_s_median']}")
    a, b = r["p1"]["losses"], r[f"p{n_gpus}"]["losses"]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    r["same_steps"] = len(a) == len(b) == args.train_steps
    r["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    r["max_rel_loss_diff"] = max(rel)
    r["max_rel_loss_diff_first10"] = max(rel[:10])
    r["losses_equal"] = r["same_steps"] and r["max_rel_loss_diff"] <= args.loss_rtol
    w1, wn = final_weights(root / "run-1"), final_weights(root / f"run-{n_gpus}")
    r["max_abs_weight_diff"] = max(float((w1[k].float() - wn[k].float()).abs().max()) for k in w1)
    log(f"train losses 1 vs {n_gpus}: max rel diff {r['max_rel_loss_diff']:.2e} (first 10 steps "
        f"{r['max_rel_loss_diff_first10']:.2e}), weights max abs diff {r['max_abs_weight_diff']:.2e}")
    if r["p1"]["img_s_median"] and r[f"p{n_gpus}"]["img_s_median"]:
        r["scaling"] = r[f"p{n_gpus}"]["img_s_median"] / r["p1"]["img_s_median"]
        if args.device == "cuda":
            r["scaling_ok"] = r["scaling"] >= 0.9 * n_gpus
        log(f"train images/s scaling 1 -> {n_gpus}: {r['scaling']:.2f}x")
    # kill one rank after the mid-run checkpoint, resume, compare the final weights
    out = root / "run-killed"
    rc, dt, err, killed = torchrun(n_gpus, ts, out, args, kill_after=out / "checkpoint.pt")
    r["killed"] = {"rc": rc, "killed": killed}
    rc2, dt2, err2, _ = torchrun(n_gpus, ts, out, args, extra=["--resume"])
    r["killed"].update(resume_rc=rc2, resume_stderr=err2[-500:] if rc2 else "")
    if rc2 == 0 and killed and rc != 0:  # only a run that really died mid-way tests the resume
        r["killed"]["same_final_weights"] = weights_digest(out) == r[f"p{n_gpus}"]["weights"]
    else:
        r["killed"]["same_final_weights"] = None  # the kill missed (or the resume failed): nothing shown
    log(f"train kill/resume: {r['killed']}")
    return r


def rnf_diff(a: Path, b: Path) -> dict:
    """Where two reinforced outputs differ: members by extension, and for ``.rnf`` the views
    whose top-1 differs and the largest probability difference."""
    import numpy as np

    import tarfile

    from silverlabel.augment import unpack

    def samples(path: Path):
        by_key: dict = {}
        with tarfile.open(path) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                by_key.setdefault(key, {})[ext] = t.extractfile(m).read()
        return sorted(by_key.items())

    d: dict = {"samples": 0, "differing_members": {}, "views": 0, "top1_differs": 0, "labels_differ": 0,
               "max_prob_diff": 0.0, "examples": []}
    for ta in sorted(a.glob("*.tar")):
        tb = b / ta.name
        for (ka, ma), (kb, mb) in zip(samples(ta), samples(tb)):
            d["samples"] += 1
            for ext in sorted(set(ma) | set(mb)):
                if ka == kb and ma.get(ext) == mb.get(ext):
                    continue
                d["differing_members"][ext] = d["differing_members"].get(ext, 0) + 1
                if ext == "rnf" and ext in ma and ext in mb:
                    ra, rb = unpack(ma[ext]), unpack(mb[ext])
                    d["views"] += ra.k
                    d["top1_differs"] += int((ra.labels[:, 0] != rb.labels[:, 0]).sum())
                    d["labels_differ"] += int((ra.labels != rb.labels).any(axis=1).sum())
                    diff = float(np.abs(ra.probs.astype(np.float32) - rb.probs.astype(np.float32)).max())
                    d["max_prob_diff"] = max(d["max_prob_diff"], diff)
                    if len(d["examples"]) < 5:
                        d["examples"].append({"key": ka, "tar": ta.name, "max_prob_diff": diff,
                                              "a_top": ra.labels[:, :3].tolist(), "b_top": rb.labels[:, :3].tolist()})
                elif len(d["examples"]) < 5:
                    d["examples"].append({"key": ka, "other_key": kb, "tar": ta.name, "ext": ext})
    return d


def bench_reinforce(args, root: Path, n_gpus: int) -> dict:
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce
    from silverlabel.teachers import TeacherSpec

    ts = root / "ts"
    digests = []
    r: dict = {}
    for workers in (1, n_gpus):
        out = root / f"rnf-{workers}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh output when --out is reused (no resumed no-op)
        t0 = time.perf_counter()
        run_reinforce(ReinforceConfig(trainset=str(ts), output=str(out), teachers=(TeacherSpec("efficientnet_lite0"),),
                                      augs=4, topk=10, device=args.device, workers=workers))
        r[f"w{workers}_seconds"] = time.perf_counter() - t0
        log(f"reinforce workers={workers}: {r[f'w{workers}_seconds']:.1f} s")
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))})
    r["identical_tars"] = digests[0] == digests[1] and len(digests[0]) > 0
    if not r["identical_tars"]:
        r["diff_1_vs_n"] = rnf_diff(root / "rnf-1", root / f"rnf-{n_gpus}")
        log(f"reinforce 1 vs {n_gpus}: {r['diff_1_vs_n']}")
        out = root / "rnf-1b"  # is one worker alone deterministic run to run?
        shutil.rmtree(out, ignore_errors=True)
        run_reinforce(ReinforceConfig(trainset=str(ts), output=str(out), teachers=(TeacherSpec("efficientnet_lite0"),),
                                      augs=4, topk=10, device=args.device, workers=1))
        r["diff_1_vs_1"] = rnf_diff(root / "rnf-1", out)
        log(f"reinforce 1 vs 1 again: {r['diff_1_vs_1']}")
    r["scaling"] = r["w1_seconds"] / r[f"w{n_gpus}_seconds"]
    r["tars"] = len(digests[0])
    log(f"reinforce: {r}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--unique", type=int, default=1000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--teachers", default="efficientnet_lite0,vit_base_patch16_224")
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-images", type=int, default=8192)
    ap.add_argument("--train-image-width", type=int, default=320, help="toy training images, 4:3")
    ap.add_argument("--train-workers", type=int, default=None, help="loader workers per rank (default: train's auto)")
    ap.add_argument("--loss-rtol", type=float, default=None,
                    help="per-step loss, 1 vs N: largest relative difference (default 0.02 cuda/bf16, 1e-5 cpu)")
    ap.add_argument("--only", default="label,train,reinforce")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.loss_rtol is None:
        args.loss_rtol = 0.02 if args.device == "cuda" else 1e-5
    if args.device == "cuda":
        import torch

        n_gpus = torch.cuda.device_count()
        if n_gpus < 2:
            log(f"{n_gpus} GPU(s): nothing to compare")
            return 2
        gpu = torch.cuda.get_device_name(0)
    else:
        n_gpus, gpu = 2, "cpu (dry run)"
    root = args.out or Path(tempfile.mkdtemp(prefix="silverlabel-multigpu-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"gpus": n_gpus, "gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))

    only = set(args.only.split(","))
    if only & {"train", "reinforce"}:
        w = args.train_image_width
        if (root / "ts" / "_info.json").exists():  # an earlier call with the same --out (one part per call)
            log(f"reusing the training set in {root / 'ts'}")
        else:
            toy_trainset(root, args.train_images, (w, w * 3 // 4))
    for part, fn in (("label", bench_label), ("train", bench_train), ("reinforce", bench_reinforce)):
        if part in only:
            try:
                res[part] = fn(args, root, n_gpus)
            except Exception as e:  # noqa: BLE001 - record it, go on with the next part
                res[part] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{part} failed: {type(e).__name__}: {e}")
            save()
    train = res.get("train") or {}
    checks = {**{f"label {x.get('teacher')} identical": x.get("identical") for x in res.get("label") or []
                 if isinstance(x, dict)},
              **{f"label {x.get('teacher')} scaling": x.get("scaling_ok") for x in res.get("label") or []
                 if isinstance(x, dict)},
              "train losses 1 vs N": train.get("losses_equal"), "train scaling": train.get("scaling_ok"),
              "train kill+resume weights": train.get("killed", {}).get("same_final_weights"),
              "reinforce identical": (res.get("reinforce") or {}).get("identical_tars")}
    res["checks"] = checks
    save()
    print(json.dumps(res, indent=1, default=str))
    log("checks: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
    failed = [k for k, c in checks.items() if c is False] + [part for part in only if "error" in (res.get(part) or {})]
    if failed:
        log(f"checks failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
