"""The defense bundle: everything needed to rebuild and serve one defended model, with its numbers.

A bundle is a folder (a local path or any pyarrow URI, ``s3://bucket/run/best``)::

    manifest.json            schema_version, specs, numbers, provenance, sha256 of every file
    classifier.pt            the adv classifier checkpoint
    stages/00-<name>.pt      learned stage files, in pipeline order
    detector/<name>.pt       the per-input detector's stage file (when it has one)

Stage specs in the manifest name their files relative to the bundle
(``ae:checkpoint=stages/00-ae.pt``); ``Bundle.build`` resolves them. The
manifest also holds the query-attack detector's configuration (a dict, see
``adv.detectors``) when one is shipped, and the clean / non-adaptive /
adaptive accuracies, each with a 95% interval, its size, a label and the
data subset it was measured on. ``Ray Tune`` (``jobs.tune``) writes bundles
to ``<run>/best/``; ``adv bundle create`` writes them without a sweep;
``adv eval --bundle`` and the Serve stage load them.

    b = write_bundle("out/best", checkpoint="model.pt", stages=["dwt:wavelet=haar"],
                     numbers={...}, provenance={...})
    b = load_bundle("out/best")          # verifies schema_version and every sha256
    model = b.build(device="cpu")        # adv.defenses.Defended
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adv.errors import AdvError
from adv.io import atomic_write_json
from adv.numbers import Number
from adv.specs import StageSpec
from adv.validation import validate_mapping

SCHEMA_VERSION = 1
FORMAT = "adv-bundle"
MANIFEST = "manifest.json"
NUMBER_KEYS = ("clean", "non_adaptive", "adaptive")


class BundleError(AdvError):
    """A bundle is missing, incomplete, tampered with or of an unknown schema; the message names the file."""


def check_numbers(numbers: dict[str, Number | dict[str, Any]]) -> dict[str, dict]:
    """The manifest's numbers (``clean`` is required; ``non_adaptive`` / ``adaptive`` when measured): each a
    :class:`~adv.numbers.Number`, or a mapping (from a file or a user) validated into one; errors name the key."""
    if not isinstance(numbers, dict) or "clean" not in numbers:
        raise BundleError("bundle numbers need at least 'clean' (and 'non_adaptive' / 'adaptive' when measured)")
    out = {}
    for key, value in numbers.items():
        if value is None:
            continue
        num = value if isinstance(value, Number) else validate_mapping(Number, value, f"bundle numbers.{key}",
                                                                        BundleError)
        out[key] = num.model_dump(mode="json")
    return out


# --- locations: a local folder or a pyarrow URI ------------------------------------------------------------
def _is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)  # file:// too: it takes the same download path as s3:// (tests use it)


def _filesystem(uri: str):
    from adv.io import open_filesystem

    return open_filesystem(uri, "bundle location", BundleError)


def _local_path(location: str | os.PathLike) -> Path:
    return Path(location)


def cache_dir() -> Path:
    """Where URI bundles are downloaded before building (``$ADV_CACHE_DIR``, else ~/.cache/adv)."""
    root = os.environ.get("ADV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "adv")
    return Path(root) / "bundles"


def _download(uri: str) -> Path:
    """Copy the bundle at ``uri`` into a fresh cache folder (hashes are checked after the copy)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    if fs.get_file_info(f"{path.rstrip('/')}/{MANIFEST}").type != pafs.FileType.File:
        raise BundleError(f"{uri}: no {MANIFEST} (not a bundle)")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache_dir().mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=cache_dir()))
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    fs.create_dir(path, recursive=True)
    # manifest.json last, so a reader never sees a manifest whose files are still missing
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST)
    for p in files:
        dest = f"{path.rstrip('/')}/{p.relative_to(local).as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(p), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# --- hashing and spec rewriting -------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_fields(name: str) -> list[str]:
    """The parameters of a stage that name a file (``checkpoint``, ``ae_checkpoint``, ...)."""
    from adv.defenses.registry import get_defense

    return [k for k in get_defense(name).params.model_fields if k == "checkpoint" or k.endswith("_checkpoint")]


def _rewrite_spec(spec: str | StageSpec, target: Path, folder: str, index: int | None) -> str:
    """Copy the files ``spec`` names into ``target/folder`` and return the spec naming them bundle-relative."""
    from adv.defenses.registry import format_defense_spec, resolve

    name, params = resolve(spec)  # validates the spec before anything is copied
    values = params.model_dump()
    for key in _file_fields(name):
        source = values.get(key)
        if not source:
            continue
        if not Path(source).is_file():
            raise BundleError(f"stage {str(spec)!r}: {key}={source} is not a file")
        stem = f"{index:02d}-{name}" if index is not None else name
        rel = f"{folder}/{stem}{'' if key == 'checkpoint' else '-' + key}.pt"
        (target / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / rel)
        values[key] = rel
    return format_defense_spec(name, values)


# --- the bundle ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    """A loaded (and, unless ``verify=False``, verified) bundle in a local folder.

    ``stage_specs`` and ``detector_spec`` are the manifest's ``stages`` and ``detector``, parsed once when the
    manifest was checked (:func:`load_bundle`); their files are bundle-relative, as in the manifest.
    """

    root: Path
    manifest: dict[str, Any]
    location: str
    stage_specs: tuple[StageSpec, ...]
    detector_spec: StageSpec | None

    @property
    def stages(self) -> list[str]:
        return list(self.manifest["stages"])

    @property
    def detector(self) -> str | None:
        return self.manifest.get("detector")

    @property
    def query_detector(self) -> dict | None:
        return self.manifest.get("query_detector")

    @property
    def numbers(self) -> dict[str, dict]:
        return self.manifest["numbers"]

    @property
    def evaluation(self) -> dict[str, Any]:
        """How the numbers were measured (test subset, eps, norm, attacks); empty when not recorded."""
        return dict(self.manifest.get("evaluation") or {})

    @property
    def checkpoint(self) -> Path:
        """The classifier file: an adv checkpoint, or the state_dict a :attr:`factory` fills."""
        return self.root / self.manifest["classifier"]["file"]

    @property
    def factory(self) -> str | None:
        """``"mypkg.nets:make_net"`` when the classifier is a user's own architecture (its module must be
        importable wherever the bundle is built); None for an adv checkpoint."""
        return self.manifest["classifier"].get("factory")

    def classifier(self):
        """The undefended classifier in eval mode on the CPU."""
        if self.factory:
            from adv.models.factory import build_from_factory

            return build_from_factory(self.factory, self.checkpoint)
        from adv.models.checkpoint import load_checkpoint

        return load_checkpoint(self.checkpoint)[0]

    def specs(self) -> tuple[list[StageSpec], StageSpec | None]:
        """The stage specs and the detector spec with absolute file paths (what ``build`` composes)."""
        det = self.detector_spec
        stages = [s.under(self.root, _file_fields(s.name)) for s in self.stage_specs]
        return stages, det.under(self.root, _file_fields(det.name)) if det else None

    def build(self, device: str = "cpu"):
        """The defended model (stages, classifier, optional detector) in eval mode on ``device``."""
        from adv.defenses.compose import build_defended
        from adv.models.device import resolve_device

        stages, detector = self.specs()
        model = build_defended(self.classifier(), stages, detector=detector)
        return model.to(resolve_device(device)).eval()

    def public_manifest(self) -> dict[str, Any]:
        """What clients may see (``GET /v1/model``), built from an allow-list: the defense names (no
        parameters: they hold thresholds and file names), the numbers with their labels and subsets, the
        dataset, input shape and class count. Never provenance (paths, hosts, commits, library versions, a
        sweep candidate's detector thresholds), file hashes or the query detector's settings."""
        clf = self.manifest["classifier"]
        numbers = {str(k): {f: v[f] for f in ("value", "ci95", "n", "label", "subset") if f in v}
                   for k, v in self.numbers.items() if isinstance(v, dict)}
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                "classifier": {"arch": str(clf.get("arch", "")), "num_classes": int(clf["num_classes"]),
                               "input_size": [int(v) for v in clf["input_size"]],
                               "dataset": str(clf.get("dataset", ""))},
                "stages": [s.name for s in self.stage_specs],
                "detector": self.detector_spec.name if self.detector_spec else None,
                "query_detector": {"enabled": True} if self.query_detector is not None else None,
                "numbers": numbers}


def write_bundle(
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    stages: list[str | StageSpec],
    detector: str | StageSpec | None = None,
    query_detector: dict | None = None,
    numbers: dict[str, Number | dict[str, Any]],
    provenance: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    factory: dict[str, Any] | None = None,
) -> Bundle:
    """Write a bundle to ``out`` (a folder or a pyarrow URI) and return it loaded (verified).

    ``evaluation`` says how the numbers were measured (``dataset``, ``split``, ``n``, ``seed`` of the test
    subset, ``eps``, ``norm``, ``attacks``): ``adv eval --bundle`` defaults to it. ``factory``
    (``{"spec": "mypkg.nets:make_net", "num_classes", "input_size", "dataset"}``) makes ``checkpoint`` the
    state_dict of a user's own architecture instead of an adv checkpoint.
    """
    checked = check_numbers(numbers)
    if query_detector is not None:  # a bundle never ships a detector config that Serve would refuse
        from adv.detectors import DetectorConfig

        query_detector = validate_mapping(DetectorConfig, query_detector, "bundle query_detector",
                                          BundleError).model_dump(mode="json")
    classifier = _classifier_entry(checkpoint, factory)  # a bundle never ships a classifier that does not load
    uri = _is_uri(out)
    staging = Path(tempfile.mkdtemp(prefix="adv-bundle-")) if uri else _local_path(out)
    if not uri:
        if (staging / MANIFEST).exists():
            _remove_bundle_files(staging)
        staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, staging / "classifier.pt")
    specs = [_rewrite_spec(s, staging, "stages", i) for i, s in enumerate(stages)]
    det = _rewrite_spec(detector, staging, "detector", None) if detector else None
    files = {p.relative_to(staging).as_posix(): sha256_file(p)
             for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classifier": {"file": "classifier.pt", **classifier},
        "stages": specs, "detector": det, "query_detector": query_detector,
        "numbers": checked, "provenance": provenance, "evaluation": evaluation or {}, "files": files,
    }
    atomic_write_json(staging / MANIFEST, manifest, indent=2, sort_keys=True)
    if uri:
        _upload(staging, str(out))
        shutil.rmtree(staging, ignore_errors=True)
        return load_bundle(str(out))
    return load_bundle(staging)


def _classifier_entry(checkpoint: str | os.PathLike, factory: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's classifier fields (arch, classes, input size, dataset), after loading the classifier once."""
    if factory is None:
        from adv.models.checkpoint import load_checkpoint

        _, meta = load_checkpoint(checkpoint)
        return {"arch": meta["arch"], "num_classes": meta["num_classes"], "input_size": meta["input_size"],
                "dataset": meta.get("dataset", "")}
    from adv.models.factory import build_from_factory

    missing = {"spec", "num_classes", "input_size"} - set(factory)
    if missing:
        raise BundleError(f"bundle factory needs {sorted(missing)} (spec, num_classes, input_size)")
    build_from_factory(factory["spec"], checkpoint)
    return {"arch": factory["spec"], "factory": factory["spec"], "num_classes": int(factory["num_classes"]),
            "input_size": [int(v) for v in factory["input_size"]], "dataset": factory.get("dataset", "")}


def save_factory_classifier(model, spec: str, path: str | os.PathLike, data) -> dict[str, Any]:
    """Save a factory-built ``model`` at ``path`` as the state_dict a bundle ships (its keys are the module's
    own, so the factory rebuilds it as it is) and return :func:`write_bundle`'s ``factory`` entry; ``data``
    (an ``ImageData``) gives the classes, input size and dataset name."""
    import torch

    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return {"spec": spec, "num_classes": data.num_classes, "input_size": list(data.input_size), "dataset": data.name}


def _remove_bundle_files(folder: Path) -> None:
    """Overwriting a bundle: remove what the old manifest listed, so no stale stage file stays behind."""
    try:
        old = json.loads((folder / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError):
        old = {}
    for rel in old:
        (folder / rel).unlink(missing_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)


def load_bundle(location: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load the bundle at ``location``; a URI is downloaded to :func:`cache_dir` first.

    Checks the format and ``schema_version`` and, with ``verify``, that every
    listed file exists with its sha256 and that no unlisted stage file was added.
    """
    root = _download(str(location)) if _is_uri(location) else _local_path(location)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{location}: no {MANIFEST} (not a bundle; write one with `adv bundle create`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an adv bundle manifest (no format {FORMAT!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path}: schema_version {version!r} is not supported "
                          f"(this adv reads {SCHEMA_VERSION})")
    for key in ("classifier", "stages", "numbers", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing key {key!r}")
    stages, detector = _check_paths(root, manifest, manifest_path)  # with or without verify: a path never leaves
    if verify:
        _verify(root, manifest["files"])
    return Bundle(root=root, manifest=manifest, location=str(location), stage_specs=stages, detector_spec=detector)


def _inside(root: Path, rel: Any, what: str, manifest_path: Path) -> str:
    """``rel`` when it names a plain file inside ``root``: relative, no ``..``, no symlink on the way."""
    from pathlib import PurePosixPath

    bad = f"{manifest_path}: {what} {str(rel)[:200]!r} is not a plain file inside the bundle"
    if not isinstance(rel, str) or not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or ":" in rel:
        raise BundleError(bad + " (a relative path is required)")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in parts) or PurePosixPath(*parts).as_posix() != rel:
        raise BundleError(bad + " (no '..', '.' or repeated '/')")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(bad + " (a symbolic link)")
    if path.exists() and not path.is_file():
        raise BundleError(bad + " (not a regular file)")
    return rel


def _manifest_spec(text: Any, manifest_path: Path) -> StageSpec:
    """A manifest's stage or detector spec, parsed (the one parse a loaded bundle makes of it); an unknown stage
    name is refused here, not when the bundle is built."""
    try:
        spec = StageSpec.parse(text)
        _file_fields(spec.name)
        return spec
    except (AdvError, TypeError, ValueError) as e:
        raise BundleError(f"{manifest_path}: bad stage spec {str(text)[:200]!r} ({e})") from None


def _check_paths(root: Path, manifest: dict, manifest_path: Path) -> tuple[tuple[StageSpec, ...], StageSpec | None]:
    """Every file the manifest names (``files``, ``classifier.file``, stage files) is a plain file inside the
    bundle, and the classifier and stage files are among the hashed ``files``. Returns the stage and detector
    specs, parsed here: the one parse a loaded bundle makes of them."""
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{manifest_path}: 'files' must map relative paths to sha256 digests")
    for rel in files:
        _inside(root, rel, "files entry", manifest_path)
    clf = manifest["classifier"]
    named = [("classifier.file", clf.get("file") if isinstance(clf, dict) else None)]
    stages = tuple(_manifest_spec(s, manifest_path) for s in manifest["stages"])
    detector = _manifest_spec(manifest["detector"], manifest_path) if manifest.get("detector") else None
    for s in (*stages, *([detector] if detector else [])):
        named += [(f"stage {s.name!r} {k}", s.get(k)) for k in _file_fields(s.name) if s.get(k)]
    for what, rel in named:
        _inside(root, rel, what, manifest_path)
        if rel not in files:
            raise BundleError(f"{manifest_path}: {what} {rel!r} is not among the hashed 'files'")
    return stages, detector


def _verify(root: Path, files: dict[str, str]) -> None:
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match its sha256 in {MANIFEST} (changed or corrupt)")
    listed = set(files) | {MANIFEST}
    for path in root.rglob("*.pt"):
        if path.relative_to(root).as_posix() not in listed:
            raise BundleError(f"bundle file {path} is not listed in {MANIFEST} (added after the bundle was made)")


def provenance_defaults() -> dict[str, Any]:
    """Library versions and the source commit when known (a git checkout), for a manifest's provenance."""
    import platform
    import subprocess

    import torch

    import adv

    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(adv.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": {"adv": adv.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "commit": commit}
