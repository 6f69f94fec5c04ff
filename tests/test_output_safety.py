"""Nothing a user had is lost: --force replaces only mam's own output, signals clean up and exit 128 + N,
output paths are checked before the work, write failures after it keep the results, folders follow the umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import SHARED

LJ = SHARED / "ljspeech-385" / "LJSpeech-1.1"


@pytest.fixture
def pair(tiny):
    return tiny("bert", layers=2), tiny("hubert-ctc", layers=2)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line(err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mam: error: ") and needle in lines[0], err


def test_force_never_replaces_an_input(pair, mam, tmp_path):
    src, tgt = pair
    before = _tree(tgt)
    r = mam("merge", src, tgt, "--lam", "0.1", "-o", tgt, "--force")
    _one_line(r.err, "it is an input of this run")
    assert r.code == 1 and _tree(tgt) == before


def test_force_never_replaces_a_folder_holding_an_input_or_the_cwd(pair, mam, tmp_path, monkeypatch):
    src, tgt = pair
    r = mam("merge", src, tgt, "--lam", "0.1", "-o", tgt.parent, "--force")
    _one_line(r.err, "holds an input")
    assert r.code == 1 and (tgt / "config.json").is_file()
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "sub")
    r = mam("merge", src, tgt, "--lam", "0.1", "-o", work, "--force")
    _one_line(r.err, "holds the current directory")
    assert (work / "notes.txt").read_text() == "mine"


def test_force_never_replaces_a_folder_mam_did_not_write(pair, mam, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    r = mam("merge", *pair, "--lam", "0.1", "-o", mine, "--force")
    _one_line(r.err, "was not written by mam")
    assert r.code == 1 and _tree(mine) == {"chapter1.tex": b"years of work"}


def test_force_replaces_an_empty_folder_and_an_earlier_output(pair, mam, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mam("merge", *pair, "--lam", "0.1", "-o", empty, "--force", "-q").code == 0
    first = (empty / "model.safetensors").read_bytes()
    assert mam("merge", *pair, "--lam", "0.3", "-o", empty, "--force", "-q").code == 0
    assert (empty / "model.safetensors").read_bytes() != first


def test_output_folder_follows_the_umask(pair, mam, tmp_path):
    old = os.umask(0o022)
    try:
        assert mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o", "-q").code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_stale_temporary_folders_of_a_killed_run_are_removed(pair, mam, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".o.{dead}.x1y2z3.mam-tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    unrelated = tmp_path / ".o.notes"
    unrelated.write_text("keep")
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o")
    assert r.code == 0 and not stale.exists() and unrelated.read_text() == "keep"
    assert f"removed {stale}" in r.err


def test_a_long_legal_output_name_gets_a_legal_temporary_sibling(pair, mam, tmp_path):
    out = tmp_path / ("m" * 250)
    r = mam("merge", *pair, "--lam", "0.1", "-o", out, "-q")
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file()


def test_second_run_on_a_locked_output_is_refused(pair, mam, tmp_path):
    from mamcli.writer import output_lock

    with output_lock(tmp_path / "o"):
        r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o")
    _one_line(r.err, "another mam run is writing")
    assert r.code == 1 and not (tmp_path / "o").exists()


def test_output_paths_are_checked_before_any_work(tiny, mam, tmp_path, monkeypatch):
    import mamcli.evaluate
    import mamcli.rank

    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(mamcli.evaluate, "Evaluator", must_not_run)
    monkeypatch.setattr(mamcli.rank, "rank_layers", must_not_run)
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = tiny("hubert-ctc", layers=2)
    r = mam("evaluate", target, "--data", f"ljspeech:{LJ}", "--limit", "2", "-o", blocker / "r.json")
    _one_line(r.err, "is not a folder")
    r = mam("evaluate", target, "--data", f"ljspeech:{LJ}", "--limit", "2", "--plot", blocker / "sub" / "p.png")
    _one_line(r.err, "is not a folder")
    r = mam("rank-layers", tiny("bert", layers=2), target, "--data", f"ljspeech:{LJ}", "-o", blocker / "r.json")
    _one_line(r.err, "is not a folder")
    r = mam("merge", tiny("bert", layers=2), target, "--lam", "0.1", "-o", blocker / "merged")
    _one_line(r.err, "is not a folder")
    assert r.code == 1


def test_a_write_failure_at_the_end_keeps_the_results_on_stdout(tiny, mam, tmp_path, monkeypatch):
    import errno

    import mamcli.report

    def full(path: Path, obj: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    original = mamcli.report.write_json
    monkeypatch.setattr(mamcli.report, "write_json", lambda p, o: full(p, o) if p.name == "r.json" else original(p, o))
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", f"ljspeech:{LJ}", "--limit", "1",
            "--format", "csv", "-o", tmp_path / "r.json", "-q")
    assert r.code == 1, r.err
    _one_line(r.err, "No space left on device")
    assert r.out.splitlines()[0].startswith("split,layers,lam") and len(r.out.splitlines()) == 2


def test_a_missing_report_folder_is_created(tiny, mam, tmp_path):
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", f"ljspeech:{LJ}", "--limit", "1",
            "-o", tmp_path / "new" / "deeper" / "r.json", "-q")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "new" / "deeper" / "r.json").read_text())["command"] == "evaluate"


def test_stdout_full_is_one_line_not_a_traceback(pair, tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "mamcli.cli", "families", "--format", "json"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    _one_line(p.stderr, "cannot write to standard output: No space left on device")


def test_a_report_to_a_device_is_written_into_it_never_renamed_over_it(tiny, mam, tmp_path):
    """-o on a character device (a copy of /dev/full, made here) writes into the device: a full one is one
    line, exit 1, and the device stays a device (a rename would have put a regular file in its place)."""
    full = tmp_path / "full"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", f"ljspeech:{LJ}", "--limit", "1", "-o", full, "-q")
    assert r.code == 1
    _one_line(r.err, f"cannot write {full}: No space left on device")
    assert stat.S_ISCHR(full.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def _run_until(args: list[str], ready: Callable[[], bool], sig: int,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `mam ARGS`, send ``sig`` once ``ready()`` holds, and collect the result."""
    proc = subprocess.Popen([sys.executable, "-m", "mamcli.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signals_during_a_merge_exit_128_plus_n_and_leave_nothing(tiny, tmp_path, sig, code):
    """A merge big enough to be caught while it writes; the signal arrives once its temporary folder exists."""
    src, tgt = tiny("bert", hidden=384, layers=8, heads=6), tiny("hubert-ctc", hidden=384, layers=8, heads=6)
    out = tmp_path / "o"
    r = _run_until(["merge", str(src), str(tgt), "--lam", "0.1", "-o", str(out), "-q"],
                   lambda: any(tmp_path.glob(".o.*.mam-tmp")), sig)
    assert r.returncode == code, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mam: interrupted by SIG"), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_during_an_evaluation_exit_128_plus_n_and_write_no_report(tiny, tmp_path, sig, code):
    target = tiny("hubert-ctc", layers=2)
    proc = subprocess.Popen([sys.executable, "-m", "mamcli.cli", "evaluate", str(target), "--data", f"ljspeech:{LJ}",
                             "--limit", "40", "-o", str(tmp_path / "r.json")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # the first progress line: the evaluation has started
    assert first.startswith("reading"), first
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, first + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("mam: interrupted by SIG") and "Traceback" not in err, err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_disk_full_during_a_merge_is_one_line_and_leaves_nothing(pair, mam, tmp_path, monkeypatch):
    """ENOSPC from the file system mid-write: exit 1 naming the reason, no temporary folder left."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and str(file).endswith(".safetensors") else f

    monkeypatch.setattr(builtins, "open", full_open)
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o")
    monkeypatch.undo()
    assert r.code == 1, r.err
    _one_line(r.err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_two_runs_started_together_on_one_output(tiny, mam, tmp_path):
    """Two real processes, one -o: one complete output and one clear refusal, never a rename error."""
    src, tgt = tiny("bert", hidden=384, layers=8, heads=6), tiny("hubert-ctc", hidden=384, layers=8, heads=6)
    out = tmp_path / "o"
    args = [sys.executable, "-m", "mamcli.cli", "merge", str(src), str(tgt), "-o", str(out), "-q"]
    procs = [subprocess.Popen([*args, "--lam", lam], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lam in ("0.1", "0.2")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refusal = next(err for code, err in results if code == 1)
    lines = refusal.strip().splitlines()
    assert len(lines) == 1 and any(m in lines[0] for m in (
        "another mam run is writing", "already exists", "appeared while this run worked")), refusal
    assert mam("verify", out).code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_signal_between_the_two_renames_puts_the_old_output_back(pair, mam, tmp_path, monkeypatch):
    """--force moves the old output aside, then the new one in: stopped in between, the old one comes back."""
    from mamcli.errors import Interrupted

    out = tmp_path / "o"
    assert mam("merge", *pair, "--lam", "0.1", "-o", out, "-q").code == 0
    before = _tree(out)
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name.endswith(".mam-tmp"):  # the second rename: the new output into place
            raise Interrupted(signal.SIGTERM)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    r = mam("merge", *pair, "--lam", "0.3", "-o", out, "--force", "-q")
    monkeypatch.undo()
    assert r.code == 143, r.err
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["o"]


NOT_UTF8 = os.fsdecode(b"out\xff")  # a name with a byte that is not UTF-8, as Python hands it over (PEP 383)


@pytest.mark.parametrize("command", ["merge", "evaluate", "rank-layers", "finetune"])
def test_output_names_that_are_not_utf8_are_written_there(command, pair, mam, tmp_path):
    """mam writes under the exact bytes given and shows the odd byte as \\xff on stdout, stderr and in files."""
    src, tgt = pair
    out = tmp_path / NOT_UTF8
    data = ("--data", f"ljspeech:{LJ}", "--limit", "2")
    args = {"merge": (src, tgt, "--lam", "0.1"), "evaluate": (tgt, *data), "rank-layers": (src, tgt, *data),
            "finetune": (tgt, *data, "--max-steps", "1", "--batch-size", "2")}[command]
    r = mam(command, *args, "-o", out)
    assert r.code == 0, r.err
    assert os.listdir(os.fsencode(tmp_path)) == [b"out\xff"]  # nothing beside it: no lock, no temporary
    if command in ("merge", "finetune"):
        assert (out / "mam_report.json").is_file()
        assert "out\\xff" in (out / "README.md").read_text(encoding="utf-8")  # the card's command line
        assert f"wrote {tmp_path}/out\\xff" in r.err or command == "finetune"
    else:
        json.loads(out.read_text(encoding="utf-8"))


def test_a_broken_cache_never_stops_a_merge(pair, mam, tmp_path, monkeypatch):
    """MAM_CACHE_DIR is a regular file: the merge still runs (its lock lives beside the output, not in the
    cache), and a second merge on the same output while the first holds it is refused by that lock."""
    from mamcli.writer import lock_path, output_lock

    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("MAM_CACHE_DIR", str(blocker))
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-is-a-file", "o"]
    assert lock_path(tmp_path / "p") == tmp_path / ".p.mam-lock"
    with output_lock(tmp_path / "p"):
        assert (tmp_path / ".p.mam-lock").is_file()
        r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "p")
        _one_line(r.err, "another mam run is writing")
    assert not (tmp_path / ".p.mam-lock").exists() and not (tmp_path / "p").exists()


def test_a_lock_file_left_by_a_killed_run_is_taken_over(pair, mam, tmp_path):
    """A run killed with SIGKILL leaves its lock file but holds no lock: the next run takes it and removes it."""
    (tmp_path / ".o.mam-lock").write_text("")
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_the_output_lock_holds_across_processes(pair, mam, tmp_path):
    """Another process (as another machine on a shared file system) holding the output's lock file: refused."""
    code = ("import sys, time; from pathlib import Path; from mamcli.writer import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "o")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o")
        _one_line(r.err, "another mam run is writing")
        assert not (tmp_path / "o").exists()
    finally:
        holder.kill()
        holder.wait()
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err


def test_a_file_system_without_locks_still_merges(pair, mam, tmp_path, monkeypatch):
    """flock refused by the file system (ENOLCK, as some network mounts answer): the merge runs unlocked and
    leaves no lock file; the atomic rename still keeps the output whole."""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    r = mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (tmp_path / "o" / "model.safetensors").is_file()


def test_only_the_console_script_skips_the_last_garbage_collections(monkeypatch):
    """`mam` freezes the garbage collector as it exits (the interpreter's last collections cost about a second);
    a Python caller of main(argv) keeps its collector."""
    import gc

    from mamcli.cli import main

    frozen: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(sys, "argv", ["mam", "--version"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and frozen == [True]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert frozen == [True]
