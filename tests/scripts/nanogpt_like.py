"""A tiny CPU training script that behaves like nanoGPT's train.py, unmodified by trainctl.

Configured nanoGPT's way: module-level defaults, overridden by `--key=value` (its
configurator.py, inline). Every `eval_interval` iterations it overwrites `out_dir/ckpt.pt` in
place with nanoGPT's keys (model, optimizer, model_args, iter_num, best_val_loss, config), and
`--init_from=resume` continues from `TRAIN_OPS_RESUME` when a launcher names the file, else
from its own `out_dir/ckpt.pt`. Deterministic: the batch of iteration i depends only on (seed,
i), so a resumed run ends with the same weights, bit for bit, as one never stopped.

Test hooks: `wait_for=DIR` waits after the k-th save until DIR/go<k> exists (so a test decides
when the script moves on, or kills it there); `stall_mid_save=k` writes half of the k-th save
in place and sleeps (a kill during the overwrite; first attempt only, as TRAIN_OPS_ATTEMPT
says, so a restart runs through); `pad_mb` makes the checkpoint larger;
`final_path` saves the final model and optimizer there.
"""

import io
import os
import sys
import time
from ast import literal_eval

import torch

out_dir = "out"
init_from = "scratch"
max_iters = 40
eval_interval = 10
always_save_checkpoint = True
seed = 1337
n_embd = 16
batch_size = 8
learning_rate = 1e-2
pad_mb = 0.0
wait_for = ""
stall_mid_save = 0
final_path = ""

config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
for arg in sys.argv[1:]:
    if not arg.startswith("--") or "=" not in arg:
        raise SystemExit(f"unknown argument {arg!r}: this script takes --key=value")
    key, val = arg[2:].split("=", 1)
    if key not in config_keys:
        raise SystemExit(f"Unknown config key: {key}")
    try:
        attempt = literal_eval(val)
    except (SyntaxError, ValueError):
        attempt = val
    globals()[key] = attempt
config = {k: globals()[k] for k in config_keys}

torch.manual_seed(seed)
model_args = {"n_embd": n_embd}
model = torch.nn.Sequential(torch.nn.Linear(n_embd, 2 * n_embd), torch.nn.Tanh(), torch.nn.Linear(2 * n_embd, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)


def get_batch(i):
    g = torch.Generator().manual_seed(seed * 100_003 + i)
    x = torch.randn(batch_size, n_embd, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


@torch.no_grad()
def estimate_loss():
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(64, n_embd, generator=g)
    return torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin()).item()


def wait_go(k):
    if not wait_for:
        return
    go = os.path.join(wait_for, f"go{k}")
    deadline = time.monotonic() + 600
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)


iter_num = 0
best_val_loss = 1e9
if init_from == "resume":
    ckpt_path = os.environ.get("TRAIN_OPS_RESUME") or os.path.join(out_dir, "ckpt.pt")
    checkpoint = torch.load(ckpt_path, map_location="cpu")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    iter_num = checkpoint["iter_num"]
    best_val_loss = checkpoint["best_val_loss"]
    print(f"resuming from {ckpt_path} at iter {iter_num}", flush=True)

saves = 0
while True:
    if iter_num % eval_interval == 0:
        val_loss = estimate_loss()
        print(f"step {iter_num}: val loss {val_loss:.4f}", flush=True)
        if val_loss < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, val_loss)
            if iter_num > 0:
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "model_args": model_args, "iter_num": iter_num,
                              "best_val_loss": best_val_loss, "config": config}
                if pad_mb:
                    checkpoint["pad"] = torch.zeros(int(pad_mb * (1 << 20)) // 4)
                saves += 1
                print(f"saving checkpoint to {out_dir}", flush=True)
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(out_dir, "ckpt.pt")
                if saves == stall_mid_save and os.environ.get("TRAIN_OPS_ATTEMPT", "0") == "0":
                    buffer = io.BytesIO()
                    torch.save(checkpoint, buffer)
                    data = buffer.getvalue()
                    with open(path, "wb") as f:  # in place, as torch.save(obj, path) does
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                        print("stalled mid-save", flush=True)
                        time.sleep(600)
                torch.save(checkpoint, path)
                print(f"saved checkpoint iter {iter_num}", flush=True)
                wait_go(saves)
    if iter_num >= max_iters:
        break
    x, y = get_batch(iter_num)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    print(f"iter {iter_num}: loss {loss.item():.4f}", flush=True)
    iter_num += 1

if final_path:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num},
               final_path)
