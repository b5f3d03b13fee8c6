"""
The leaf every module may import; it imports nothing of the project. Errors and the command line (UserError, cli,
configure), device and precision (Runtime, setup), data set paths, atomic writes, checkpoint files, RNG state.
"""
import ast
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

STAGES = ("pretrain", "sft", "dpo", "reward", "ppo")
POLICY_STAGES = ("pretrain", "sft", "dpo", "ppo")  # checkpoints with a language-model head to generate with


class UserError(Exception):
    """Bad input or config. cli() prints it as one line, `error: ...`, and exits with status 2."""


def cli(main):
    """Run a stage's main(): a UserError becomes `error: <message>` on stderr and exit status 2, without a
    traceback; Ctrl-C outside the training loop (which saves and exits on its own) becomes exit status 130.
    Under torchrun, a main() that returns waits for every process to return too, then closes the process group:
    a process that left (and tore its connections down) while another was still evaluating or printing could
    abort that one at exit. On an error there is no waiting: the process exits, and torchrun stops the others."""
    try:
        main()
    except UserError as e:
        msg = " ".join(str(e).split("\n"))  # exactly one line, whatever the message
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# config

CONFIG_TYPES = (bool, int, float, str, tuple)


def config_keys(globals_dict):
    """A stage's settings: its lowercase module constants of a plain type. ALL_CAPS names are fixed constants,
    _private names are not settings."""
    return [k for k, v in globals_dict.items()
            if not k.startswith("_") and not k.isupper() and type(v) in CONFIG_TYPES]


def _coerce(key, value, default, where):
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:  # an int is fine where a float is expected (--learning_rate=1)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    elif want is tuple:
        if isinstance(value, (tuple, list)):
            return tuple(value)
    kind = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}[want]
    raise UserError(f"{where}: {key} must be {kind} like its default {default!r}, got {value!r}")


def _parse_value(text, default):
    # Python literals (3, 1e-3, True, (0.9, 0.95), 'quoted'); anything else is a plain string, so that
    # --dataset=data/mine and --init_from=scratch need no quotes. A str setting keeps the text as typed
    # (--prompt=123 is the string '123').
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def _read_preset(path):
    if not os.path.isfile(path):
        alt = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", path)
        alt = alt if os.path.isfile(alt) else alt + ".py"
        if not os.path.isfile(alt):
            raise UserError(f"{path}: no such config file (arguments are config/PRESET.py files or --key=value)")
        path = alt
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        ns = {}
        exec(compile(src, path, "exec"), ns)
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a preset is plain assignments; anything else going wrong is the file's fault
        raise UserError(f"{path}: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in ns.items() if not k.startswith("_") and type(v).__name__ != "module"}
    return path, values


def configure(globals_dict, argv=None):
    """Apply `config/PRESET.py` files and `--key=value` overrides (in the order given; later wins) to a stage's
    settings, in place in `globals_dict`, and return the settings as a dict.

    Settings are the stage's lowercase module constants of type bool/int/float/str/tuple. Values are Python
    literals (ast.literal_eval); text that is not a literal is a string. Each value is checked against the
    default's type: an int is accepted for a float, True/False (or true/false) for a bool, `--flag` alone means
    True for a bool. An unknown key, a wrong type or a missing file is a UserError naming it. `--help` prints the
    script's docstring and its settings and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    script = os.path.basename(globals_dict.get("__file__") or "this script")
    keys = config_keys(globals_dict)
    for arg in argv:
        if arg in ("-h", "--help"):
            lines = [(globals_dict.get("__doc__") or "").strip(), "", "settings (--key=value):"]
            lines += [f"  --{k}={globals_dict[k]!r}" for k in keys]
            try:
                print("\n".join(lines))
            except BrokenPipeError:  # `--help | head`
                pass
            sys.exit(0)
        if not arg.startswith("--"):
            path, values = _read_preset(arg)
            for k, v in values.items():
                if k not in keys:
                    raise UserError(f"{path}: unknown key {k!r}: {script} has no setting {k!r}")
                globals_dict[k] = _coerce(k, v, globals_dict[k], path)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in keys:
            raise UserError(f"unknown key --{key}: {script} has no setting {key!r} (--help lists them)")
        default = globals_dict[key]
        if not eq:
            if not isinstance(default, bool):
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            text = "True"
        globals_dict[key] = _coerce(key, _parse_value(text, default), default, f"--{key}")
    return {k: globals_dict[k] for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# device, precision, DDP

@dataclass
class Runtime:
    """Where and how this process computes. `autocast` is a reusable context manager (a no-op in fp32);
    `scaler` a GradScaler that is enabled only for fp16. Under torchrun: ddp=True, rank/local_rank/world_size
    set, and only the master process (rank 0) writes files and prints."""
    device: str
    device_type: str       # 'cuda' | 'mps' | 'cpu'
    dtype: torch.dtype     # autocast dtype; float32 = no autocast
    autocast: object
    scaler: torch.amp.GradScaler
    compile: bool
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master: bool = True

    def to_device(self, t):
        """Copy a CPU tensor to the device; on CUDA through pinned memory, asynchronously."""
        if self.device_type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def _flag(value, name):
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"--{name} must be auto, True or False, got {value!r}")


def setup(device="auto", dtype="auto", seed=1337, compile="auto"):
    """Pick the device (device='auto': CUDA, then MPS, then CPU; or 'cuda', 'cuda:1', 'mps', 'cpu'), the precision
    (dtype='auto': bf16 autocast on CUDA where supported, else fp16 with a grad scaler; fp32 on MPS and CPU; or
    'float32' | 'bfloat16' | 'float16'), torch.compile (compile='auto': on CUDA only), start DDP when run under
    torchrun (NCCL on CUDA, gloo on CPU), and seed torch, numpy and random. Every process gets the same seed:
    the model starts identical everywhere and the trainer gives each process its own batches."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device must be auto, cuda, cuda:N, mps or cpu, got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA GPU is available (this torch build or machine has none)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available (needs Apple silicon and a recent macOS)")
    if ddp and device_type == "mps":
        raise UserError("torchrun (DDP) runs on CUDA or CPU, not MPS")
    if ddp and device_type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process
    if device_type == "cuda":
        if ":" in device:  # plain 'cuda' is the current device; set_device needs an index
            torch.cuda.set_device(device)
        # TF32 matmuls: ~free accuracy-wise for training, several times faster fp32 matmuls on Ampere+
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:  # CPU: autocast is slower than fp32 for these sizes; MPS: fp32 is the dependable default
            dtype = "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    ptdtype = dtypes[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    # fp16 has a narrow exponent: scale the loss so small gradients do not flush to zero. bf16 needs none.
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)

    compile = _flag(compile, "compile")
    if compile == "auto":
        compile = device_type == "cuda"

    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")  # cli() closes it
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return Runtime(device=device, device_type=device_type, dtype=ptdtype, autocast=autocast, scaler=scaler,
                   compile=compile, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                   master=rank == 0)



# ----------------------------------------------------------------------------------------------------------------
# data sets

def dataset_dir(name):
    """--dataset=NAME is data/NAME; a value containing a path separator is a path as given."""
    return name if ("/" in name or os.sep in name) else os.path.join("data", name)


def data_file(dataset, filename):
    """Path of a prepared data file, or a UserError saying how to make it."""
    path = os.path.join(dataset_dir(dataset), filename)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: prepare the data first (python prepare.py"
                        f"{'' if dataset == 'world' else ' --dataset=' + dataset + ' ...'}) or pass --dataset=")
    return path



# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def write_atomic(path, write, mode="wb"):
    """Call write(f) on a temporary file beside `path` (named after this process, so two processes writing the
    same file cannot trip over each other), fsync it, then rename it over `path`: a crash or Ctrl-C at any point
    leaves the old file or the new one, never half of one. Every file this project writes goes through here."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, obj):
    """torch.save, atomically (write_atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))
    try:  # make the rename itself durable (POSIX; a no-op where folders cannot be opened)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_STAGE_NAMES = {"pretrain": "a pretraining", "sft": "an SFT", "dpo": "a DPO", "reward": "a reward model",
                "ppo": "a PPO"}


def load_checkpoint(path, stages=None):
    """Load one of our checkpoints (a stage's folder means its ckpt.pt) with weights_only=True onto the CPU.
    `stages`: the stages it may come from; anything else is a one-line UserError naming the file: missing,
    unreadable, not one of ours, or the wrong kind ("a reward model checkpoint cannot be used as a policy")."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        hint = f" (run the {'/'.join(stages)} stage first, or pass the right path)" if stages else ""
        raise UserError(f"{path}: no such checkpoint{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and unpickler-allowlist errors all mean "not a checkpoint we can read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    needed = ("stage", "model_config", "model", "tokenizer")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed) or ckpt["stage"] not in STAGES:
        raise UserError(f"{path}: not a checkpoint of this project (it needs {', '.join(needed)})")
    stage = ckpt["stage"]
    if stages is not None and stage not in stages:
        if stage == "reward":
            msg = "a reward model checkpoint cannot be used as a policy"
        elif tuple(stages) == ("reward",):
            msg = f"{_STAGE_NAMES[stage]} checkpoint is a policy, not a reward model (train one with reward_model.py)"
        else:
            msg = f"{_STAGE_NAMES[stage]} checkpoint cannot be used here"
        raise UserError(f"{path}: {msg}; expected a checkpoint of stage {' or '.join(stages)}")
    return ckpt


def rng_state():
    """Every random generator's state, as values that torch.load(weights_only=True) accepts."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])

