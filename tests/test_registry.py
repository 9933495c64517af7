"""Short names and the assembly of parted models, on hand-built part packages in a tmp dir."""

import hashlib
import io
import json
import shutil

import pytest

from flashinfer_lite import registry
from flashinfer_lite.errors import FlashInferError, InvalidModelFileError, ModelNotFoundError
from flashinfer_lite.registry import PartedModel, assemble

# Three parts of uneven sizes; a small read size makes the copy take many steps per part.
SIZES = (1000, 37, 2500)
CHUNK = 64


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three part packages on sys.path and an empty cache; returns (model, expected bytes)."""
    site = tmp_path / "site"
    blobs = []
    for i, size in enumerate(SIZES, 1):
        pkg = site / f"flfake_part{i}"
        (pkg / "data").mkdir(parents=True)
        # Importing a part package is a bug: they were made for another application.
        (pkg / "__init__.py").write_text("raise ImportError('part packages are data only')\n")
        blob = bytes((i * 7 + j * 13) % 256 for j in range(size))
        (pkg / "data" / f"part{i:02}.bin").write_bytes(blob)
        blobs.append(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_CHUNK", CHUNK)
    data = b"".join(blobs)
    model = PartedModel(
        name="fake-3p", file_name="fake-3p.gguf", extra="qwen",
        parts=tuple((f"flfake_part{i}", f"data/part{i:02}.bin") for i in (1, 2, 3)),
        size=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )
    return model, data


def models_dir_files(model):
    d = model.target.parent
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_assembles_verifies_and_reports_progress(parts):
    model, data = parts
    seen = []
    path = assemble(model, progress=lambda done, total: seen.append((done, total)))
    assert path == model.target and path.read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and len(seen) > len(SIZES)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    record = json.loads(registry._sidecar(path).read_text())
    assert record == {"size": len(data), "sha256": model.sha256}
    assert models_dir_files(model) == ["fake-3p.gguf", "fake-3p.gguf.verified.json"]


def test_default_progress_bar_goes_to_stderr(parts, capsys):
    model, data = parts
    assemble(model)
    err = capsys.readouterr().err
    assert "assembling fake-3p" in err and "(100%)" in err


def test_second_call_trusts_the_verified_file(parts, tmp_path):
    model, data = parts
    assemble(model)
    calls = []
    # the parts are gone: only the verified file in the cache can answer
    for i in (1, 2, 3):
        (tmp_path / "site" / f"flfake_part{i}" / "data" / f"part{i:02}.bin").unlink()
    assert assemble(model, progress=lambda d, t: calls.append(d)) == model.target
    assert calls == []


def test_a_file_that_does_not_match_its_record_is_assembled_again(parts):
    model, data = parts
    assemble(model)
    with open(model.target, "r+b") as f:  # truncated after the check
        f.truncate(10)
    calls = []
    assemble(model, progress=lambda d, t: calls.append(d))
    assert calls and model.target.read_bytes() == data
    registry._sidecar(model.target).unlink()  # no record: not trusted either
    calls.clear()
    assemble(model, progress=lambda d, t: calls.append(d))
    assert calls and model.target.read_bytes() == data


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(parts):
    model, data = parts
    bad = PartedModel(**{**model.__dict__, "sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(InvalidModelFileError, match="sha256") as exc:
        assemble(bad, progress=lambda d, t: None)
    assert "\n" not in str(exc.value) and bad.sha256 in str(exc.value)
    assert "pip install --force-reinstall 'flashinfer-lite[qwen]'" in str(exc.value)
    assert not model.target.exists() and models_dir_files(model) == []


def test_parts_of_the_wrong_size_fail_before_copying(parts):
    model, data = parts
    bad = PartedModel(**{**model.__dict__, "size": model.size + 1})
    calls = []
    with pytest.raises(InvalidModelFileError, match="expected"):
        assemble(bad, progress=lambda d, t: calls.append(d))
    assert calls == [] and models_dir_files(model) == []


def test_missing_part_package_names_the_extra_and_the_part(parts, tmp_path):
    model, data = parts
    shutil.rmtree(tmp_path / "site" / "flfake_part2")
    with pytest.raises(ModelNotFoundError) as exc:
        assemble(model, progress=lambda d, t: None)
    msg = str(exc.value)
    assert "part 2 of 3" in msg and "flfake-part2" in msg
    assert "pip install 'flashinfer-lite[qwen]'" in msg and "\n" not in msg
    assert isinstance(exc.value, FlashInferError) and models_dir_files(model) == []


def test_missing_data_file_in_an_installed_part(parts, tmp_path):
    model, data = parts
    (tmp_path / "site" / "flfake_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="part 3 of 3"):
        assemble(model, progress=lambda d, t: None)


@pytest.mark.parametrize("stop_at", [CHUNK, 1000 + 37 + CHUNK])
def test_interrupted_assembly_leaves_nothing_and_the_next_call_succeeds(parts, stop_at):
    model, data = parts

    def interrupt(done, total):
        if done >= stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assemble(model, progress=interrupt)
    assert not model.target.exists() and models_dir_files(model) == []
    assert assemble(model, progress=lambda d, t: None).read_bytes() == data


def test_failed_write_leaves_nothing(parts, monkeypatch):
    """A disk error mid-copy (ENOSPC) removes the temporary file."""
    model, data = parts
    written = [0]

    class FullDisk(io.FileIO):
        def write(self, b):
            written[0] += len(b)
            if written[0] > 500:
                raise OSError(28, "No space left on device")
            return super().write(b)

    def fake_open(path, mode="r"):
        return FullDisk(path, "w") if "w" in mode else io.FileIO(path, "r")

    monkeypatch.setattr(registry, "open", fake_open, raising=False)  # the module's open only
    with pytest.raises(OSError, match="No space"):
        assemble(model, progress=lambda d, t: None)
    assert written[0] > 500 and models_dir_files(model) == []


# the models whose parts the [test] extra installs (the 1.5B's 1.1 GB stays out of it)
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_installed_parts_add_up_to_the_model(name):
    """The real part packages are found without importing them, in order, and their sizes add
    up to the file the checksum is for."""
    model = registry.PARTED_MODELS[name]
    paths = [registry.part_path(pkg, rel) for pkg, rel in model.parts]
    assert None not in paths, f"{name}'s parts are not installed (extra [{model.extra}])"
    assert sum(p.stat().st_size for p in paths) == model.size
    assert paths[0].read_bytes()[:4] == b"GGUF"


def test_short_names_are_listed_for_users():
    from click.testing import CliRunner

    from flashinfer_lite.cli.main import app

    names = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert all(n in registry.SHORT_NAMES for n in names)
    for command in (["inspect", "--help"], ["generate", "--help"]):
        # wide: click would otherwise wrap the help at the names' hyphens
        out = CliRunner().invoke(app, command, terminal_width=200, max_content_width=200).output
        assert all(n in out for n in names), out
    with pytest.raises(ModelNotFoundError, match="qwen2.5-coder-1.5b"):
        registry.resolve_model("no-such-model")
