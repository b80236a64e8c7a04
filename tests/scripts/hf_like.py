"""A tiny CPU training script that saves and resumes the way a Hugging Face Trainer run does.

Every `--save_steps` steps it writes `output_dir/checkpoint-N/` (model.safetensors, optimizer.pt,
rng_state.pth, then trainer_state.json last, as the Trainer does), keeps the newest
`--save_total_limit` folders, and `--resume_from_checkpoint PATH` continues from a folder.
Deterministic: the batch of step i depends only on (seed, i).

Test hooks: `--wait_for DIR` waits after the k-th save until DIR/go<k> exists; `--stall_mid_save k`
writes half of the k-th folder's weights and sleeps (a kill during the save; first attempt only,
as TRAIN_OPS_ATTEMPT says); `--final_path` saves the final model and optimizer there.
"""

import argparse
import json
import os
import shutil
import struct
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", required=True)
parser.add_argument("--max_steps", type=int, default=40)
parser.add_argument("--save_steps", type=int, default=10)
parser.add_argument("--save_total_limit", type=int, default=0)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--learning_rate", type=float, default=1e-2)
parser.add_argument("--resume_from_checkpoint", default=None)
parser.add_argument("--wait_for", default="")
parser.add_argument("--stall_mid_save", type=int, default=0)
parser.add_argument("--final_path", default="")
args = parser.parse_args()

DIM = 12
STEPS_PER_EPOCH = 10


def save_safetensors(tensors, path, *, stop_at=None):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    payload = struct.pack("<Q", len(raw)) + raw + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(payload if stop_at is None else payload[:stop_at])


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        buf = bytearray(data[8 + n + begin:8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(spec["shape"]).clone()
    return out


def get_batch(i):
    g = torch.Generator().manual_seed(args.seed * 100_003 + i)
    x = torch.randn(8, DIM, generator=g)
    return x, x.mean(dim=1, keepdim=True).cos()


def wait_go(k):
    if not args.wait_for:
        return
    go = os.path.join(args.wait_for, f"go{k}")
    deadline = time.monotonic() + 600
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)


torch.manual_seed(args.seed)
model = torch.nn.Sequential(torch.nn.Linear(DIM, 24), torch.nn.ReLU(), torch.nn.Linear(24, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)
global_step = 0
log_history = []
if args.resume_from_checkpoint:
    folder = args.resume_from_checkpoint
    model.load_state_dict(load_safetensors(os.path.join(folder, "model.safetensors")))
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt")))
    with open(os.path.join(folder, "trainer_state.json")) as f:
        state = json.load(f)
    global_step = state["global_step"]
    log_history = state["log_history"]
    print(f"resuming from {folder} at step {global_step}", flush=True)

saves = 0
while global_step < args.max_steps:
    x, y = get_batch(global_step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    global_step += 1
    epoch = global_step / STEPS_PER_EPOCH
    log_history.append({"loss": round(loss.item(), 6), "epoch": epoch, "step": global_step})
    print({"loss": round(loss.item(), 4), "epoch": epoch, "step": global_step}, flush=True)
    if global_step % args.save_steps == 0:
        saves += 1
        folder = os.path.join(args.output_dir, f"checkpoint-{global_step}")
        os.makedirs(folder, exist_ok=True)
        print(f"Saving model checkpoint to {folder}", flush=True)
        weights = dict(model.state_dict())
        if saves == args.stall_mid_save and os.environ.get("TRAIN_OPS_ATTEMPT", "0") == "0":
            save_safetensors(weights, os.path.join(folder, "model.safetensors"), stop_at=100)
            print("stalled mid-save", flush=True)
            time.sleep(600)
        save_safetensors(weights, os.path.join(folder, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
        torch.save({"cpu": torch.get_rng_state()}, os.path.join(folder, "rng_state.pth"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "tiny-mlp", "hidden_size": 24, "input_dim": DIM}, f)
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            json.dump({"global_step": global_step, "epoch": epoch, "max_steps": args.max_steps,
                       "log_history": log_history, "best_metric": None,
                       "best_model_checkpoint": None}, f)
        if args.save_total_limit:
            kept = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")),
                          key=lambda d: int(d.split("-")[1]))
            for old in kept[:-args.save_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, old))
        print(f"saved checkpoint-{global_step}", flush=True)
        wait_go(saves)

if args.final_path:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": global_step},
               args.final_path)
