"""Datasets as uint8 tensors, and the reproducible batch stream the trainer draws from.

    load_dataset(name, data_dir=None, image_size=None, train=True) -> (images, labels, class_names)
        images: uint8 (N, C, H, W); labels: int64 (N,) or None; class_names: list of str or None

name is "mnist", "cifar10", "faces", "celeba", a folder of images, or an .npz file holding `images`
(uint8 N×H×W×C) and optionally `labels` and `class_names`. The data directory is data_dir, else
$DDPM_DATA, else ./data. Inside it, <name>_train.npz / <name>_test.npz are used when present
(offline copies), else torchvision downloads MNIST / CIFAR-10 there. "faces" is faces64.npz, the
build machines' 4,800 CelebA faces; "celeba" is the whole of CelebA, cropped once to 64×64 from the
official img_align_celeba (zip or folder, else torchvision's download) into celeba64_{train,test}.npz.

Batches turns the images into an endless stream of training batches in [−1, 1]. The order is a
pure function of (seed, epoch, position), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and under DDP every rank takes its own slice of each batch.
"""

import functools
import hashlib
import os
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plumbing.files import atomic_write, cache_dir
from plumbing.images import to_model_range

def default_class_names(num_classes, names=None):
    """names if there is one per class, else "0", "1", …: what a model's classes are called."""
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


MNIST_CLASSES = default_class_names(10)
NAMED = ("mnist", "cifar10", "faces", "celeba")
FACES_HELD_OUT = 300      # faces64.npz's last 300 faces by celeba_id: never trained on, they are the
                          # faces' "test" split (the FID floor and the copy check)
CACHE_AFTER_S = 2.0         # an .npz that takes longer to decode is kept in the cache folder as .npy


def data_root(data_dir=None):
    """data_dir, else $DDPM_DATA, else ./data."""
    return Path(data_dir or os.environ.get("DDPM_DATA") or "data")


# ----------------------------------------------------------------------------- loading

def _where(path):
    """"mnist_train.npz in /abs/dir": how an error names a data file."""
    path = Path(path).resolve()
    return f"{path.name} in {path.parent}"


@functools.lru_cache(maxsize=4)
def _read_npz(path, mtime_ns, size):
    """Decode an .npz once per process. LZMA members (cifar10_train.npz: ~9 s on 2 cores) are
    also written once to the cache folder as .npy, which later processes read in well under a second.
    A file that does not decode raises ValueError, in one line that names it and says what to do."""
    cache = cache_dir()                   # slow-to-decode .npz files are kept there as plain .npy
    stem = f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{size}-{mtime_ns}"
    damaged = False
    if cache is not None and (cache / f"{stem}.done").exists():
        try:
            keys = (cache / f"{stem}.done").read_text().split()
            arrays = {k: np.load(cache / f"{stem}.{k}.npy", allow_pickle=False) for k in keys}
            if all(isinstance(v, np.ndarray) for v in arrays.values()):
                return arrays
            raise ValueError("not .npy arrays")
        except (OSError, ValueError, EOFError) as e:   # EOFError: an empty .npy
            damaged = True
            print(f"note: the cached copy of {Path(path).name} in {cache} is damaged ({type(e).__name__}); "
                  "decoding the .npz again and rebuilding the cache", file=sys.stderr)
    t0 = time.time()
    try:
        if not zipfile.is_zipfile(path):        # else np.load takes it for a pickle, and says so
            raise zipfile.BadZipFile("File is not a zip file")
        with np.load(path, allow_pickle=False) as d:
            members = {k: d[k] for k in d.files}
            claimed = {k for k in d.files if f"{k}.npy" in d.zip.namelist()}
            stored = all(info.compress_type == zipfile.ZIP_STORED for info in d.zip.infolist())   # np.savez's
    except MemoryError:
        raise
    except Exception as e:      # BadZipFile (bad CRC), zlib / lzma errors, EOFError, a bad .npy header, ...
        todo = "make it readable" if isinstance(e, PermissionError) else "re-download or remove it"
        kind = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"   # zlib.error
        why = " ".join(f"{kind}: {e}".split())                    # one line, whatever the library wrote
        raise ValueError(f"{_where(path)} is not a readable .npz ({why}); {todo}") from None
    arrays = {k: v for k, v in members.items() if isinstance(v, np.ndarray)}   # not a README stored beside them
    for k in sorted(claimed - set(arrays)):  # np.load hands back a member without the .npy header as bytes
        raise ValueError(f"{_where(path)} is not a readable .npz (its member {k}.npy is not a .npy array); "
                         "re-download or remove it")
    if cache is not None and (damaged or (time.time() - t0 > CACHE_AFTER_S and not stored)):   # stored: no faster as .npy
        try:
            for k, v in arrays.items():
                atomic_write(cache / f"{stem}.{k}.npy", lambda f, v=v: np.save(f, v))
            atomic_write(cache / f"{stem}.done", lambda f: f.write(" ".join(arrays).encode()))
        except OSError:
            pass                                                   # read-only home: no cache, no harm
    return arrays


def load_npz(path):
    """An .npz of uint8 `images` (N, H, W, C) with C = 1 or 3, or (N, H, W) grey [+ `labels`: N integers,
    `class_names`] -> the three outputs. Anything else raises ValueError, in one line that says what
    was found, what was expected and what to do."""
    path = Path(path)
    stat = path.stat()
    arrays = _read_npz(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    where = _where(path)
    if "images" not in arrays:
        raise ValueError(f"{where} has no 'images' array (it has {sorted(arrays)}); expected uint8 images shaped "
                         "N×H×W×C (C = 1 or 3) or N×H×W: re-save it with np.savez(path, images=..., labels=...)")
    x = arrays["images"]
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: 'images' is {x.dtype} {x.shape}; expected uint8 (0…255): re-save it with "
                         "images.astype(np.uint8), scaled to 0…255 first if it holds floats in [0, 1]")
    if x.ndim == 3:                                                   # N×H×W grey
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape:
        hint = ("channels first? re-save it with images.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3)
                else "re-save it in that shape")
        raise ValueError(f"{where}: 'images' has shape {arrays['images'].shape}; expected N×H×W×C with C = 1 or 3 "
                         f"(or N×H×W for grey) and N, H, W > 0: {hint}")
    images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())       # (N, C, H, W), a copy: the decode stays cached
    labels = None
    if "labels" in arrays and arrays["labels"].size:        # empty: no labels (generate.py --npz of an
        y = arrays["labels"]                                 # unconditional model wrote one until 2026-11)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{where}: 'labels' is {y.dtype}; expected integer class indices 0, 1, …: re-save it "
                             "with labels.astype(np.int64), or without labels")
        if y.shape != (len(x),):
            raise ValueError(f"{where}: 'labels' has shape {y.shape} for {len(x)} images; expected one label per "
                             f"image, shape ({len(x)},): re-save it with matching labels, or without labels")
        if y.min() < 0:
            raise ValueError(f"{where}: 'labels' has negative values (min {y.min()}); expected class indices "
                             "0, 1, …: re-save it with labels numbered from 0, or without labels")
        labels = torch.from_numpy(y.astype(np.int64))
    class_names = [str(c) for c in arrays["class_names"].reshape(-1)] if "class_names" in arrays else None
    return images, labels, class_names


def _load_torchvision(name, root, train):
    """The torchvision datasets, downloaded into root when the network allows. Offline, the error
    says where the offline copy was looked for and how to point at one; no empty folder is left."""
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    existed = {p for p in [root, *root.rglob("*")] if p.is_dir()} if root.exists() else set()
    try:
        ds = cls(root=str(root), train=train, download=True)
    except Exception as e:      # offline, firewall, ...
        for folder in sorted({p for p in root.rglob("*") if p.is_dir()} - existed, reverse=True) if root.exists() else []:
            if not any(folder.iterdir()):
                folder.rmdir()                      # what the failed download created, and left empty
        if root.exists() and root not in existed and not any(root.iterdir()):
            root.rmdir()
        split = "train" if train else "test"
        raise FileNotFoundError(
            f"{name}: found no {root / f'{name}_{split}.npz'}, and torchvision could not download {name} into "
            f"{root}/ ({type(e).__name__}; offline?). Point --data-dir or the DDPM_DATA variable at a folder "
            f"holding {name}_{split}.npz, e.g. DDPM_DATA=path/to/data python {'train_mnist.py' if name == 'mnist' else 'train_cifar.py'}.") from None
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:
        x = x[..., None]
    images = x.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    class_names = MNIST_CLASSES if name == "mnist" else list(ds.classes)
    return images, labels, class_names


def resize_images(images, size):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased; a center crop first if not square."""
    H, W = images.shape[-2:]
    if H != W:
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        images = images[..., top:top + s, left:left + s]
    if images.shape[-1] == size:
        return images
    out = []
    for chunk in images.split(1024):
        y = F.interpolate(chunk.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _to_rgb(img):
    """Any PIL mode -> RGB; transparency is composited onto white (not left as garbage colour)."""
    from PIL import Image
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_image(path, image_size):
    """One image file -> uint8 (3, size, size): center crop to a square, Lanczos resize."""
    from PIL import Image
    with Image.open(path) as img:
        img.load()                                   # decode now, so a corrupt file fails here
        img = _to_rgb(img)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != image_size:
        img = img.resize((image_size, image_size), Image.LANCZOS, reducing_gap=3.0 if s >= 3 * image_size else None)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image_folder(folder, image_size=64):
    """Every readable image under folder (recursively, in sorted order) -> uint8 (N, 3, size, size).

    Files that are not images or do not decode are skipped and counted in one plain note on stderr."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    # Decoding 30k photos takes minutes: the result is cached, keyed by every file's name, size and time.
    listing = "\n".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha1(f"{listing}\n{image_size}".encode()).hexdigest()[:16]
    cache = cache_dir()
    cached = cache / f"folder-{key}.npy" if cache is not None and files else None
    if cached is not None and cached.exists():
        return torch.from_numpy(np.load(cached, allow_pickle=False))
    t0 = time.time()
    images, skipped = [], []
    for p in files:
        try:
            images.append(load_image(p, image_size))
        except Exception:      # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
            skipped.append(p.name)
    if skipped:
        print(f"note: {folder}: skipped {len(skipped)} of {len(files)} files that are not readable images "
              f"(e.g. {', '.join(skipped[:3])})", file=sys.stderr)
    if not images:
        raise FileNotFoundError(
            f"no readable images in {folder} ({len(files)} files looked at). Put .jpg/.png images in it "
            "(subfolders are fine), or pass --dataset mnist | cifar10 | faces | a path to an .npz file.")
    images = torch.stack(images)
    if cached is not None and time.time() - t0 > 2.0:
        try:
            atomic_write(cached, lambda f: np.save(f, images.numpy()))
        except OSError:
            pass                                                   # read-only home: no cache, no harm
    return images


# ----------------------------------------------------------------------------- CelebA

CELEBA_SIZE = (178, 218)            # px, w × h: CelebA's aligned & cropped images (img_align_celeba)
CELEBA_BOX = (19, 51, 159, 191)     # 140×140 centred at (x, y) = (89, 121), where DDIM's 128×128 crop is centred
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}    # list_eval_partition.txt's numbers
CELEBA_RANGES = (162_770, 182_637, 202_599)    # the same partition by file number (000001 … 162770 train, …)
CELEBA_POOL_AFTER = 2000            # images: a larger set is decoded by one process per core


def celeba_cache(root, split):
    """<data dir>/celeba64_<split>.npz: the 64×64 crops of one split, built once by build_celeba."""
    return Path(root) / f"celeba64_{split}.npz"


def celeba_source(root):
    """The official CelebA files under the data dir -> (images: a zip or a folder, or None; folder of
    list_eval_partition.txt). Looked for in <data dir>/celeba/ (torchvision's layout), then the data dir."""
    root = Path(root)
    for folder in (root / "celeba", root):
        for images in (folder / "img_align_celeba.zip", folder / "img_align_celeba"):
            if images.exists():
                return images, folder
    return None, None


def _celeba_partition(folder, ids):
    """{celeba id: 0 train / 1 valid / 2 test} from list_eval_partition.txt (in folder or folder/Eval),
    else from the published ranges of file numbers, which is the same partition."""
    for path in (folder / "list_eval_partition.txt", folder / "Eval" / "list_eval_partition.txt"):
        if path.exists():
            try:
                part = {int(name.split(".")[0]): int(p) for name, p in
                        (line.split() for line in path.read_text().splitlines() if line.strip())}
            except ValueError:              # not "000001.jpg 0" lines
                raise ValueError(f"celeba: {_where(path)} is not CelebA's partition (lines '000001.jpg 0'); "
                                 "re-download it, or remove it to split by file number") from None
            return {i: part.get(i, _celeba_range(i)) for i in ids}
    print(f"note: celeba: no list_eval_partition.txt in {folder}; using CelebA's partition by file number "
          "(000001–162770 train, –182637 valid, –202599 test)", file=sys.stderr)
    return {i: _celeba_range(i) for i in ids}


def _celeba_range(i):
    return 0 if i <= CELEBA_RANGES[0] else 1 if i <= CELEBA_RANGES[1] else 2


def celeba_crop(img, size=64):
    """One aligned CelebA image (PIL, 178×218) -> uint8 (size, size, 3): the 140×140 crop around the face,
    resized with Lanczos (antialiased)."""
    from PIL import Image
    return np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS, box=CELEBA_BOX), dtype=np.uint8)


def _decode_celeba(item):
    """(name, JPEG bytes or a path) -> (name, uint8 (64, 64, 3)) or (name, the reason it is unusable).
    A module-level function: the worker processes of build_celeba run it."""
    import io
    from PIL import Image
    name, src = item
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            if img.size != CELEBA_SIZE:
                return name, f"{img.size[0]}×{img.size[1]} px, not CelebA's aligned {CELEBA_SIZE[0]}×{CELEBA_SIZE[1]}"
            return name, celeba_crop(img)
    except Exception as e:          # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        return name, f"{type(e).__name__}: {e}"


def _open_celeba(source, what):
    """img_align_celeba as a .zip or a folder -> (the open zip or None, read(name) -> bytes or path,
    {name: CelebA number} for its NNNNNN.jpg files); one line where it cannot be read or holds none."""
    if source.is_file():
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"celeba: {what} is not a readable zip ({type(e).__name__}: {e}); re-download it, or "
                             f"extract it to {source.parent / 'img_align_celeba'}/") from None
        names, read = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg")), archive.read
    else:
        archive, read = None, (lambda n: n)
        names = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() == ".jpg")
    ids = {n: int(Path(n).stem) for n in names if Path(n).stem.isdigit()}
    if not ids:
        if archive:
            archive.close()
        raise FileNotFoundError(f"celeba: no CelebA images (000001.jpg, …) in {what} ({len(names)} .jpg files); "
                                "put the official img_align_celeba there, or pass --dataset PATH for a folder of "
                                "other face images")
    return archive, read, ids


def _write_celeba(out, root):
    """{split: (images, celeba_id)} -> celeba64_<split>.npz in root, atomically, test first."""
    for split in ("test", "train"):
        images, ids_ = out[split]
        path = celeba_cache(root, split)
        try:
            atomic_write(path, lambda f: np.savez(f, images=images, celeba_id=ids_))
        except OSError as e:
            raise ValueError(f"celeba: cannot write {path} ({e.strerror or e}); make {Path(root)} writable "
                             "or pass a --data-dir you can write to") from None
    print(f"celeba: wrote {celeba_cache(root, 'train')} ({len(out['train'][0]):,} faces) and "
          f"{celeba_cache(root, 'test')} ({len(out['test'][0]):,}); later runs load them", file=sys.stderr)


def build_celeba(source, partition_folder, root):
    """The official img_align_celeba (.zip or folder) -> celeba64_train.npz and celeba64_test.npz in root
    (uint8 images N×64×64×3 and celeba_id, in file order), written atomically, test first: a build
    that stops midway leaves no file that looks complete. CelebA's partition: 0 -> train, 2 -> test;
    its 19,867 'valid' images go to neither (nothing here selects models on them). A zip or folder that
    cannot be read raises ValueError / FileNotFoundError in one line; the source is never modified."""
    from tqdm.auto import tqdm
    source = Path(source)
    what = f"{_where(source)}" if source.is_file() else f"{source}/"
    archive, read, ids = _open_celeba(source, what)
    partition = _celeba_partition(Path(partition_folder), ids.values())
    wanted = {split: sorted((n for n in ids if partition[ids[n]] == CELEBA_SPLITS[split]), key=ids.get)
              for split in ("train", "test")}
    for split, members in wanted.items():
        if not members:
            raise FileNotFoundError(f"celeba: {what} holds no image of CelebA's {split} partition "
                                    f"({len(ids)} images); it needs the whole img_align_celeba")
    out = {}
    workers = min(os.cpu_count() or 1, 16) if len(ids) > CELEBA_POOL_AFTER else 1
    pool = None
    if workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        with tqdm(total=sum(map(len, wanted.values())), desc=f"celeba: cropping {what} to 64×64", unit="img",
                  file=sys.stderr) as bar:
            for split, members in wanted.items():
                images = np.empty((len(members), 64, 64, 3), np.uint8)
                items = ((n, read(n)) for n in members)
                results = pool.imap(_decode_celeba, items, chunksize=64) if pool else map(_decode_celeba, items)
                for i, (name, img) in enumerate(results):
                    if isinstance(img, str):
                        raise ValueError(f"celeba: {Path(name).name} in {what} is not usable ({img}); "
                                         "re-download or re-extract img_align_celeba") from None
                    images[i] = img
                    bar.update()
                out[split] = images, np.array([ids[n] for n in members], np.int64)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:      # a damaged member, an archive cut short
        raise ValueError(f"celeba: {what} is damaged ({type(e).__name__}: {e}); re-download it") from None
    finally:
        if pool:
            pool.terminate()
        if archive:
            archive.close()
    _write_celeba(out, root)


CELEBA_WAYS = ("supply faces in one of three ways: online, torchvision downloads CelebA by itself; or place the "
               "official img_align_celeba.zip (or its extracted img_align_celeba/ folder) in {root}/celeba/; or "
               "pass --dataset PATH to a folder of CelebA-HQ or any face images (on the build machines, "
               "faces64.npz in the data dir is used)")


def _download_celeba(root):
    """torchvision's CelebA download into <root>/celeba/ (Google Drive; it often refuses). Offline or
    refused, FileNotFoundError in one line naming the ways to supply faces; no empty folder is left."""
    import torchvision
    existed = {p for p in [root, *root.rglob("*")] if p.is_dir()} if root.exists() else set()
    try:
        torchvision.datasets.CelebA(str(root), split="all", target_type=[], download=True)
    except Exception as e:      # offline, Google Drive's quota, gdown missing, ...
        made = sorted({p for p in [root, *root.rglob("*")] if p.is_dir()} - existed, reverse=True) if root.exists() else []
        for folder in made:
            if not any(folder.iterdir()):
                folder.rmdir()
        why = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise FileNotFoundError(f"celeba: no CelebA in {root}, and torchvision could not download it ({why}); "
                                + CELEBA_WAYS.format(root=root)) from None


def load_celeba(root, train=True):
    """CelebA's train (or test) split as 64×64 crops -> uint8 (N, 3, 64, 64): from the built cache, else
    built once from the official zip or folder, else downloaded by torchvision, then built."""
    root = Path(root)
    split = "train" if train else "test"
    if not (celeba_cache(root, "train").exists() and celeba_cache(root, "test").exists()):
        source, folder = celeba_source(root)
        if source is None:
            _download_celeba(root)
            source, folder = celeba_source(root)
        build_celeba(source, folder, root)
    images, _, _ = load_npz(celeba_cache(root, split))
    return images


def celeba_default(data_dir=None):
    """train_celeba.py's dataset: "celeba" where CelebA is in the data dir (built, zip or folder) or
    nothing is, so that it downloads; "faces" where only the build machines' faces64.npz is."""
    root = data_root(data_dir)
    have_celeba = celeba_cache(root, "train").exists() or celeba_source(root)[0] is not None
    return "faces" if (root / "faces64.npz").exists() and not have_celeba else "celeba"


def load_dataset(name, data_dir=None, image_size=None, train=True):
    """(images uint8 (N, C, H, W), labels int64 (N,) or None, class_names or None); see the module doc.

    image_size: the side to resize to (default: the dataset's own; 64 for an image folder).
    train: the training split (named datasets only; an image folder or .npz is one split)."""
    name = str(name)
    if name in NAMED:
        root = data_root(data_dir)
        if name == "faces":
            path = root / "faces64.npz"
            if not path.exists():
                raise FileNotFoundError(f"faces: {path} does not exist. Pass --data-dir (or set DDPM_DATA) to the "
                                        "folder with faces64.npz, or --dataset <a folder of face images>.")
            images, _, _ = load_npz(path)
            labels, class_names = None, None        # celeba_id is an identity, not a class
            images = images[faces_split(path, len(images), train)]
        elif name == "celeba":
            images, labels, class_names = load_celeba(root, train), None, None
        else:
            path = root / f"{name}_{'train' if train else 'test'}.npz"
            if path.exists():
                images, labels, class_names = load_npz(path)
                if name == "mnist" and class_names is None:
                    class_names = MNIST_CLASSES
            else:
                images, labels, class_names = _load_torchvision(name, root, train)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            return load_image_folder(path, image_size or 64), None, None
        if path.suffix == ".npz" and path.is_file():
            images, labels, class_names = load_npz(path)
        else:
            raise FileNotFoundError(f"unknown dataset {name!r}: use mnist, cifar10, faces, celeba, a folder of images "
                                    "or an .npz file with an 'images' array")
    if image_size is not None and (images.shape[-1] != image_size or images.shape[-2] != image_size):
        images = resize_images(images, image_size)
    return images, labels, class_names


def faces_split(path, n, train):
    """Indices of faces64.npz's training faces (all but the last FACES_HELD_OUT by celeba_id) or of
    the held-out ones (train=False), in celeba_id order. Without celeba_id: the file's order."""
    stat = Path(path).stat()
    ids = _read_npz(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size).get("celeba_id")
    order = np.argsort(ids, kind="stable") if ids is not None and len(ids) == n else np.arange(n)
    held = min(FACES_HELD_OUT, n // 2)
    return torch.from_numpy(order[:n - held] if train else order[n - held:])


def load_split(name, data_dir=None, image_size=None, split="train", limit=None):
    """load_dataset's split by name ("train" / "test"), optionally an even subset of `limit` images."""
    images, labels, class_names = load_dataset(name, data_dir, image_size, train=(split == "train"))
    images, labels = subset(images, labels, limit)
    return images, labels, class_names


def dataset_source(name, data_dir=None, train=True):
    """The file or folder load_dataset(name, …) reads its split from, or None where a named dataset
    is not there yet (it downloads or builds on first use)."""
    name = str(name)
    if name not in NAMED:
        return Path(name).expanduser()
    root = data_root(data_dir)
    if name == "faces":
        return root / "faces64.npz"
    if name == "celeba":
        built = celeba_cache(root, "train" if train else "test")
        return built if built.exists() else celeba_source(root)[0]
    path = root / f"{name}_{'train' if train else 'test'}.npz"
    folder = root / {"mnist": "MNIST", "cifar10": "cifar-10-batches-py"}[name]      # torchvision's download
    return path if path.exists() else folder if folder.exists() else None


def source_tag(name, data_dir=None, train=True):
    """8 hex digits of where `name` is read from: the resolved file, its size and time of change; for
    a folder, those of every file below it (a folder's own time of change misses a file rewritten in
    place or added in a subfolder); or the data dir, where nothing is there yet. Caches of statistics
    over a dataset carry it in their names, so that another copy (another data dir, torchvision's
    download in place of an .npz, a file written anew) never reuses statistics of the first."""
    path = dataset_source(name, data_dir, train)
    if path is None or not path.exists():
        where = f"{data_root(data_dir).resolve()}/{name}"
    elif path.is_dir():
        stats = sorted((str(p.relative_to(path)), p.stat()) for p in path.rglob("*") if p.is_file())
        where = f"{path.resolve()}|" + "|".join(f"{rel}:{st.st_size}:{st.st_mtime_ns}" for rel, st in stats)
    else:
        stat = path.stat()
        where = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(where.encode()).hexdigest()[:8]


def dataset_slug(name):
    """"mnist" -> "mnist"; "photos/faces.npz" or "photos/" -> "faces" / "photos" (for file names)."""
    name = str(name)
    return name if "/" not in name and "." not in name else Path(name.rstrip("/")).stem


def match_channels(images, channels):
    """uint8 (N, C, H, W) -> (N, channels, H, W): grey repeated to RGB, or RGB averaged to grey."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    return images.float().mean(dim=1, keepdim=True).round().to(torch.uint8).expand(-1, channels, -1, -1)


def subset(images, labels, n):
    """n images spread evenly over the set (CIFAR-10's file is sorted by class, so not the first n)."""
    if not n or n >= len(images):
        return images, labels
    idx = torch.linspace(0, len(images) - 1, n).round().long()
    return images[idx], (labels[idx] if labels is not None else None)


# ----------------------------------------------------------------------------- batching

def flip_where(x, flip):
    """x: (B, C, H, W), flip: (B,) bool -> the flagged images mirrored left-right."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class _GatherBatch(torch.utils.data.Dataset):
    """DataLoader path: a key is (indices, flips) for one batch, gathered in a worker."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __getitem__(self, key):
        idx, flip = key
        x = flip_where(self.images[idx], flip)
        y = self.labels[idx] if self.labels is not None else torch.empty(0, dtype=torch.long)
        return x, y

    def __len__(self):
        return len(self.images)


class Batches:
    """Endless stream of (x in [−1, 1] (B, C, H, W) float on device, labels (B,) or None).

    Epoch e's order and flips come from numpy's generator seeded with (seed, e), so the stream is
    a pure function of (seed, epoch, index): state_dict() is just that position. The last
    incomplete batch of an epoch is dropped (every batch has the same shape).

    DDP: batch_size is the global batch; rank r takes its slice [r·B/W, (r+1)·B/W) of every
    batch, so W processes see exactly the batches one process would.

    On CUDA, a dataset that fits in a quarter of the GPU memory is stored there as uint8 and
    batched there (no loader workers, no copies). Otherwise (on the CPU too) the images stay in
    host memory: on the CPU they are indexed in place (workers would only steal its cores); on a
    GPU a DataLoader gathers them in workers into pinned memory.
    """

    def __init__(self, images, labels, batch_size, seed=0, flip=False, device="cpu",
                 rank=0, world_size=1, num_workers=4, use_loader=None):
        device = torch.device(device)
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} must divide evenly over {world_size} processes")
        if len(images) < batch_size:
            raise ValueError(f"the dataset has {len(images)} images, fewer than one batch of {batch_size}; "
                             "lower --batch-size")
        self.n = len(images)
        self.batch_size, self.seed, self.flip = batch_size, seed, flip
        self.device, self.rank, self.world_size = device, rank, world_size
        self.local_batch = batch_size // world_size
        self.steps_per_epoch = self.n // batch_size
        self.num_workers = num_workers
        self.epoch, self.index = 0, 0                  # the next batch is `index` of epoch `epoch`
        fits = device.type != "cuda" or images.nbytes < 0.25 * torch.cuda.get_device_properties(device).total_memory
        self.use_loader = (not fits) if use_loader is None else use_loader      # override: for tests
        fits = fits and not self.use_loader
        self.images = images.to(device) if fits else images
        self.labels = None if labels is None else (labels.to(device) if fits else labels)
        self._iter = None

    # -- position
    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if self.index >= self.steps_per_epoch:                 # e.g. resumed with a larger batch
            self.epoch, self.index = self.epoch + 1, 0
        self._iter = None

    # -- the plan of one epoch
    def epoch_plan(self, epoch):
        """-> (perm (N,) int64, flips (N,) bool) for epoch `epoch`, the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = torch.from_numpy(rng.permutation(self.n))
        flips = torch.from_numpy(rng.random(self.n) < 0.5) if self.flip else torch.zeros(self.n, dtype=torch.bool)
        return perm, flips

    def _keys(self, epoch, start):
        """This rank's (indices, flips) for batches start … end of the epoch."""
        perm, flips = self.epoch_plan(epoch)
        for i in range(start, self.steps_per_epoch):
            lo = i * self.batch_size + self.rank * self.local_batch
            yield perm[lo:lo + self.local_batch], flips[lo:lo + self.local_batch]

    def _stream(self):
        while True:
            epoch, start = self.epoch, self.index
            if self.use_loader:
                keys = list(self._keys(epoch, start))
                loader = torch.utils.data.DataLoader(_GatherBatch(self.images, self.labels), batch_size=None,
                                                     sampler=keys, num_workers=self.num_workers,
                                                     pin_memory=self.device.type == "cuda")
                for x, y in loader:
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True) if self.labels is not None else None
                    yield x, y
            else:
                for idx, flip in self._keys(epoch, start):
                    idx, flip = idx.to(self.images.device), flip.to(self.images.device)
                    x = flip_where(self.images[idx], flip)
                    yield x, (self.labels[idx] if self.labels is not None else None)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            self._iter = self._stream()
        x, y = next(self._iter)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return to_model_range(x), y
