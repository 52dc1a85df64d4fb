"""Start-up profiles: record (through a real container on a real mount), store, load, replay as
prefetch; order, no double fetch, stale entries, cancellation on unmount."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefs import profile as profiles
from imagefs.fs import mounts
from imagefs.images import load_index, parse_ref, read_tag, resolve, set_tag
from imagefs.importers.rootfs import import_rootfs
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.fixtures.runner import make_busybox_root, needs_runc

MB = 1 << 20


def _image(tmp: Path) -> tuple[LocalStore, str]:
    root = make_busybox_root(tmp / "root")
    rng = random.Random(3)  # the same chunk boundaries every run
    for name in ("a", "b", "c"):
        (root / name).write_bytes(rng.randbytes(10 * MB))  # >= 3 chunks each (max chunk 4 MiB): one is its own
    store = LocalStore(tmp / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(root))
    set_tag(store, parse_ref("prof:1"), image_id)
    return store, image_id


def _chunks_of(store: LocalStore, image_id: str, path: str) -> list[str]:
    index = load_index(store, image_id)
    ext = index.inode(index.resolve(path)).extents or []
    out: list[str] = []
    for i in range(0, len(ext), 3):
        d = index.chunks[ext[i]]
        if d not in out:
            out.append(d)
    return out


def _owners(index) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """How many files each chunk holds bytes of."""
    count: dict[str, int] = {}
    for ino in index.inodes:
        ext = ino.extents or []
        for d in {index.chunks[ext[i]] for i in range(0, len(ext), 3)}:
            count[d] = count.get(d, 0) + 1
    return count


def cs(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLDSTART_STORE=f"file://{tmp}/store", COLDSTART_RUN_DIR=str(tmp / "run"),
               COLDSTART_CACHE=str(tmp / "cache"))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@needs_runc
def test_record_store_load_in_first_touch_order(tmp_path: Path) -> None:
    store, image_id = _image(tmp_path)
    r = cs(tmp_path, "profile", "record", "--json", "--ready-regex", "^ready$", "prof:1", "--",
           "/bin/sh", "-c", "cat /c /a > /dev/null; echo ready; sleep 30; cat /b > /dev/null")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    prof = profiles.load(store, read_tag(store, parse_ref("prof:1"))["profile"])
    order = [d for d, _ in prof.chunks]
    c, a, b = (_chunks_of(store, image_id, p) for p in ("/c", "/a", "/b"))
    # First-touch order: every chunk only /c has comes before every chunk only /a has (a file's
    # first and last chunk may hold its tree neighbours too); cut at ready: /b's own chunks unread.
    index = load_index(store, image_id)
    shared = {d for d, n in _owners(index).items() if n > 1}
    c_only, a_only, b_only = (set(x) - shared for x in (c, a, b))
    assert c_only and a_only and (c_only | a_only) <= set(order)
    assert max(order.index(d) for d in c_only) < min(order.index(d) for d in a_only)
    assert not b_only & set(order)
    assert doc["chunks"] == len(prof.chunks) and prof.image == image_id
    assert doc["names"] == len(prof.names) and ("l", "/c") in prof.names  # the shell's lookups
    assert resolve(store, "prof:1") == image_id  # recording leaves the image ID alone
    shown = json.loads(cs(tmp_path, "profile", "show", "prof:1", "--json").stdout)
    assert shown["profile"] == doc["profile"] and [d for d, _ in shown["chunk_list"]] == order
    assert not list((tmp_path / "run").glob("record-*"))  # the private mount's state is gone
    assert not [l for l in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in l]


@needs_runc
def test_run_record_profile_then_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, image_id = _image(tmp_path)
    r = cs(tmp_path, "run", "--record-profile", "prof:1", "--", "/bin/sh", "-c", "cat /b > /dev/null")
    assert r.returncode == 0 and "recorded profile" in r.stderr, r.stderr
    recorded = {d for d, _ in profiles.load(store, read_tag(store, parse_ref("prof:1"))["profile"]).chunks}
    assert set(_chunks_of(store, image_id, "/b")) <= recorded
    shared = {d for d, n in _owners(load_index(store, image_id)).items() if n > 1}
    assert not (set(_chunks_of(store, image_id, "/c")) - shared) & recorded  # /c's own chunks unread
    prof = profiles.load(store, read_tag(store, parse_ref("prof:1"))["profile"])
    assert prof.pack  # what the replay below must find mapped
    r = cs(tmp_path, "run", "prof:1", "--", "/bin/sh", "-c", "cat /b | md5sum")
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == hashlib.md5((tmp_path / "root" / "b").read_bytes()).hexdigest()
        # The run's shared mount (it lingers for the next container) replayed the tag's profile:
        # its read-set pack is mapped, which no other prefetch source has.
        monkeypatch.setenv("COLDSTART_RUN_DIR", str(tmp_path / "run"))
        (state,) = mounts.list_mounts()
        assert state["image"] == image_id
        assert mounts.read_stats(state["mountpoint"])["fetch"]["pack_segments"] == len(prof.pack)
    finally:
        cs(tmp_path, "umount", "--all")


def _wait(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_replay_fetches_in_background_once(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    store, image_id = _image(tmp_path)
    wanted = _chunks_of(store, image_id, "/a") + _chunks_of(store, image_id, "/c")
    index = load_index(store, image_id)
    sizes = dict(zip(index.chunks, index.chunk_sizes))
    digest = profiles.save(store, profiles.Profile(image_id, [(d, sizes[d]) for d in wanted]), parse_ref("prof:1"))
    info = mounter.mount(f"file://{tmp_path}/store", image_id, profile=digest)
    stats = lambda: mounts.read_stats(info.mountpoint)["fetch"]  # noqa: E731
    _wait(lambda: stats()["by_kind"]["prefetch"]["chunks"] == len(wanted))
    data = (Path(info.mountpoint) / "a").read_bytes() + (Path(info.mountpoint) / "c").read_bytes()
    assert len(data) == 20 * MB
    s = stats()
    assert s["by_kind"]["demand"]["chunks"] == 0  # everything it read was prefetched
    assert s["chunks_fetched"] == len(set(wanted))  # and nothing was fetched twice


def _startup(mnt: Path) -> bytes:
    """A start-up that reads 2 MiB from the middle of /c, then all of /a."""
    with open(mnt / "c", "rb") as f:
        f.seek(3 * MB)
        part = f.read(2 * MB)
    return part + (mnt / "a").read_bytes()


def test_replay_of_a_read_set_pack_on_a_real_mount(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Record through the kernel (part of /c, all of /a), save with its pack, replay on a fresh
    mount with an empty host cache: the same reads come from the pack's segments, and less is
    fetched than the chunks they touch."""
    store, image_id = _image(tmp_path)
    url = f"file://{tmp_path}/store"

    first = mounter.mount(url, image_id, cache_dir=tmp_path / "cache1")
    want = _startup(Path(first.mountpoint))
    trace = mounts.read_trace(first.mountpoint)
    mounter.unmount(first)
    prof = profiles.from_trace(image_id, trace)
    digest = profiles.save(store, prof, parse_ref("prof:1"))
    assert prof.pack and 12 * MB <= prof.pack_bytes < prof.bytes
    info = mounter.mount(url, image_id, profile=digest, cache_dir=tmp_path / "cache2")
    stats = lambda: mounts.read_stats(info.mountpoint)["fetch"]  # noqa: E731
    _wait(lambda: stats()["by_kind"]["prefetch"]["chunks"] == len(prof.pack))
    assert _startup(Path(info.mountpoint)) == want
    s = stats()
    assert s["by_kind"]["demand"]["chunks"] == 0 and s["by_kind"]["readahead"]["chunks"] == 0
    assert s["pack_reads"] > 0 and s["pack_dropped"] == 0
    assert s["raw_bytes_fetched"] == prof.pack_bytes < prof.bytes
    assert s["pack_segments"] == len(prof.pack)
    human = subprocess.run([sys.executable, "-m", "tools.cli", "stats", info.mountpoint],
                           capture_output=True, text=True, timeout=60).stdout  # the mounter's run dir
    assert f"pack      {len(prof.pack)} read-set segments, {s['pack_reads']} reads" in human
    shown = json.loads(cs(tmp_path, "profile", "show", "prof:1", "--json").stdout)
    assert shown["pack_segments"] == len(prof.pack) and shown["pack_bytes"] == prof.pack_bytes
    # Reads right after the mount is up (before any prefetch) already know the pack: the daemon
    # loads the profile while it loads the index, and says it is ready once the pack is mapped.
    # (How much they fetch is not pinned here: while segments arrive and are pushed into the page
    # cache, the kernel's readahead may ask for a little past what it asked while recording, and
    # those bytes load their chunks; seen once in a full-suite run: 1.85 MB more, two chunks.)
    mounter.unmount(info)
    info = mounter.mount(url, image_id, profile=digest, cache_dir=tmp_path / "cache4")
    assert stats()["pack_segments"] == len(prof.pack)
    assert _startup(Path(info.mountpoint)) == want
    s = stats()
    assert s["pack_reads"] > 0 and s["pack_dropped"] == 0, s
    # The CLI's mount streams the tag's profile when asked to (and says when there is none).
    mp = mounter.mountpoint()
    r = cs(tmp_path, "mount", "--prefetch", "--json", "--cache", str(tmp_path / "cache3"), "prof:1", str(mp))
    try:
        assert r.returncode == 0 and json.loads(r.stdout)["profile"] == digest, r.stderr
        _wait(lambda: json.loads(cs(tmp_path, "stats", "--json", str(mp)).stdout)
              ["fetch"]["by_kind"]["prefetch"]["chunks"] == len(prof.pack))
    finally:
        cs(tmp_path, "umount", str(mp))
    set_tag(store, parse_ref("plain:1"), image_id)
    r = cs(tmp_path, "mount", "--prefetch", "plain:1", str(mp))
    assert r.returncode != 0 and "not a tag with a start-up profile" in r.stderr and not mounts.is_mounted(str(mp))


def test_stale_profile_entries_are_ignored_with_a_warning(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    store, image_id = _image(tmp_path)
    real = _chunks_of(store, image_id, "/a")
    index = load_index(store, image_id)
    sizes = dict(zip(index.chunks, index.chunk_sizes))
    bogus = [("f" * 64, 123), ("0" * 64, 456)]
    digest = profiles.save(store, profiles.Profile(image_id, bogus + [(d, sizes[d]) for d in real]), None)
    info = mounter.mount(f"file://{tmp_path}/store", image_id, profile=digest)
    _wait(lambda: mounts.read_stats(info.mountpoint)["fetch"]["by_kind"]["prefetch"]["chunks"] == len(real))
    assert (Path(info.mountpoint) / "a").read_bytes()[:10]
    _wait(lambda: "does not have" in Path(info.log_path).read_text())
    assert mounts.read_stats(info.mountpoint)["fetch"]["errors"] == 0


def test_missing_profile_blob_means_no_prefetch(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    store, image_id = _image(tmp_path)
    info = mounter.mount(f"file://{tmp_path}/store", image_id, profile="e" * 64)
    assert (Path(info.mountpoint) / "c").stat().st_size == 10 * MB
    _wait(lambda: "no prefetch" in Path(info.log_path).read_text())


def test_unmount_cancels_a_running_prefetch(tmp_path: Path, mounter, s3_server) -> None:  # type: ignore[no-untyped-def]
    """A slow store (SeaweedFS behind a 100 ms delay proxy): unmount long before the profile is
    done; the daemon stops at once instead of finishing the prefetch."""
    from bench.services import free_ports
    from imagefs.store.factory import open_store
    from imagefs.transfer import copy_image

    local, image_id = _image(tmp_path)
    url = s3_server.url_for(s3_server.new_bucket_name(), "img")
    with open_store(url) as s3:
        copy_image(local, s3, image_id)
    port = free_ports(1)[0]
    proxy = subprocess.Popen([sys.executable, "-m", "bench.delayproxy", f"127.0.0.1:{port}",
                              s3_server.endpoint.split("//")[1], "100"], stdout=subprocess.PIPE)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        slow = url.split("?")[0] + f"?endpoint=http://127.0.0.1:{port}"
        index = load_index(local, image_id)
        everything = list(zip(index.chunks, index.chunk_sizes))
        with open_store(slow) as s3:
            digest = profiles.save(s3, profiles.Profile(image_id, everything), None)
        info = mounter.mount(slow, image_id, profile=digest, limits={"prefetch_workers": 1})
        time.sleep(0.3)
        done = mounts.read_stats(info.mountpoint)["fetch"]["by_kind"]["prefetch"]["chunks"]
        assert done < len(everything)  # still prefetching
        t = time.monotonic()
        mounter.unmount(info)
        assert time.monotonic() - t < 5
        assert not mounts.daemon_alive(info.pid)
    finally:
        proxy.kill()
        proxy.wait()


# -- learned on this host ------------------------------------------------------------------------
def test_learn_keeps_first_touch_order_within_the_window(tmp_path: Path) -> None:
    store, image_id = _image(tmp_path)
    index = load_index(store, image_id)
    s = 1_000_000_000
    events = [(0, "file", 5, -1, -1), (1, "chunk", 5, 2, 0), (2, "chunk", 5, 0, 0), (3, "chunk", 6, 2, 0),
              (int(59 * s), "chunk", 6, 1, 0), (int(61 * s), "chunk", 6, 3, 0), (int(62 * s), "chunk", 7, 999, 0)]
    names = [{"t": 5.0, "kind": "lookup", "ino": 1, "path": "/a"}, {"t": 70.0, "kind": "list", "ino": 1, "path": "/"}]
    prof = profiles.learn(index, image_id, events, names=names)
    assert prof.chunks == [(index.chunks[c], index.chunk_sizes[c]) for c in (2, 0, 1)] and prof.files == 1
    assert prof.names == [("l", "/a")]  # the listing came after the window
    profiles.save_learned(str(tmp_path / "cache"), prof)
    assert profiles.load_learned(str(tmp_path / "cache"), image_id) == prof
    assert profiles.load_learned(str(tmp_path / "cache"), "f" * 64) is None
    Path(profiles.learned_path(str(tmp_path / "cache"), image_id)).write_bytes(b"{not json")
    assert profiles.load_learned(str(tmp_path / "cache"), image_id) is None  # ignored, not fatal


def test_next_mount_on_the_host_prefetches_what_the_last_one_read(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """A mount remembers its first touches in the host cache directory when it ends; the next
    mount of the image (no profile) checks those chunks into the page cache ahead of demand."""
    store, image_id = _image(tmp_path)
    url, cache = f"file://{tmp_path}/store", str(tmp_path / "cache")
    info = mounter.mount(url, image_id, cache_dir=cache)
    assert (Path(info.mountpoint) / "b").read_bytes()
    mounter.unmount(info)
    learned = profiles.load_learned(cache, image_id)
    assert learned is not None and set(_chunks_of(store, image_id, "/b")) <= {d for d, _ in learned.chunks}
    assert ("l", "/b") in learned.names
    info = mounter.mount(url, image_id, cache_dir=cache)
    stats = lambda: mounts.read_stats(info.mountpoint)["fetch"]  # noqa: E731
    _wait(lambda: stats()["disk"]["hits"] >= len(learned.chunks))  # each checked in place
    _wait(lambda: mounts.read_stats(info.mountpoint)["names"]["done"] == len(learned.names))  # and its names
    before = stats()["disk"]["part_reads"]
    assert (Path(info.mountpoint) / "b").read_bytes()
    s = stats()
    assert s["chunks_fetched"] == 0 and s["disk"]["part_reads"] > before  # straight from the page cache
    mounter.unmount(info)
    info = mounter.mount(url, image_id, cache_dir=cache)  # touched nothing: keeps what was learned
    mounter.unmount(info)
    assert profiles.load_learned(cache, image_id) is not None


# -- names: the start-up's lookups and listings, replayed through the mount ------------------------
def test_names_from_a_trace_round_trip_and_stay_out_of_older_encodings(tmp_path: Path) -> None:
    events = [{"t": 0.1, "kind": "lookup", "ino": 1, "path": "/etc"},
              {"t": 0.2, "kind": "file", "ino": 5, "path": "/etc/passwd"},
              {"t": 0.3, "kind": "lookup", "ino": 2, "path": "/etc/nope"},
              {"t": 0.4, "kind": "list", "ino": 2, "path": "/etc"},
              {"t": 0.5, "kind": "lookup", "ino": 2, "path": "/etc/nope"},
              {"t": 9.0, "kind": "lookup", "ino": 1, "path": "/late"}]
    prof = profiles.from_trace("a" * 64, events, until=5.0)
    assert prof.names == [("l", "/etc"), ("l", "/etc/nope"), ("d", "/etc")] and prof.files == 1
    assert profiles.Profile.decode(prof.encode(), "x").names == prof.names
    plain = profiles.Profile("a" * 64, [("b" * 64, 10)], created=1.0)
    assert b"names" not in plain.encode()  # a profile without names encodes as it did before
    for bad in ([["x", "/a"]], [["l", "relative"]], [["l"]]):
        doc = json.loads(plain.encode())
        doc["names"] = bad
        try:
            profiles.Profile.decode(json.dumps(doc).encode(), "x")
        except profiles.CorruptBlob:
            continue
        raise AssertionError(f"accepted names {bad}")


def test_warm_plan_keeps_only_paths_through_real_directories(tmp_path: Path) -> None:
    """The kernel's walk of a replayed path must not follow a symlink (it could lead out of the
    mount): entries whose directory part is not reached through directories alone are dropped."""
    from imagefs.fs import warm

    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    (root / "a/f").write_text("x")
    os.symlink("a", root / "rel")
    os.symlink("/etc", root / "abs")
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(root))
    index = load_index(store, image_id)
    names = [("l", "/a"), ("d", "/"), ("l", "/a/b/missing"), ("d", "/a/b"), ("l", "/rel/f"),
             ("l", "/abs/shadow"), ("d", "/abs"), ("l", "/a/../../x"), ("l", "/a/f/under-a-file"),
             ("d", "/a/f"), ("l", "/nodir/x"), ("l", "//a//f"), ("l", "/" + "a/" * 3000 + "x"), ("l", "/a/..")]
    assert warm.plan(index, names) == [("l", b"a"), ("d", b"."), ("l", b"a/b/missing"), ("d", b"a/b")]


def test_name_worker_does_every_entry_and_a_failed_one_is_an_error(tmp_path: Path) -> None:
    import trio

    from imagefs.fs import warm

    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    entries = [("l", b"d"), ("d", b"d"), ("l", b"d/missing"), ("l", b"d/f"), ("d", b"."), ("d", b"nodir")]
    stats = warm.WarmStats()
    trio.run(warm.replay, str(tmp_path), entries, stats)
    assert stats.done == len(entries) and not stats.running and stats.seconds > 0
    try:
        trio.run(warm.replay, str(tmp_path / "not-there"), entries, warm.WarmStats())
    except ValueError as e:
        assert "exited with status" in str(e)
    else:
        raise AssertionError("a worker that could not start reported success")


def test_a_profile_s_names_are_warmed_in_the_kernel_before_the_container_asks(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Record the names a start-up looked up and listed; a mount with that profile asks them
    itself, so the same start-up on it then makes no lookup or readdir the daemon has to answer."""
    store, image_id = _image(tmp_path)
    url = f"file://{tmp_path}/store"

    def startup(mnt: Path) -> None:
        sorted(os.listdir(mnt / "bin"))
        for name in ("etc/passwd", "etc/missing", "bin/sh", "a"):
            os.path.lexists(mnt / name)

    first = mounter.mount(url, image_id, cache_dir=tmp_path / "cache1")
    startup(Path(first.mountpoint))
    prof = profiles.from_trace(image_id, mounts.read_trace(first.mountpoint))
    mounter.unmount(first)
    assert ("d", "/bin") in prof.names and ("l", "/etc/missing") in prof.names
    digest = profiles.save(store, prof, None)
    info = mounter.mount(url, image_id, profile=digest, cache_dir=tmp_path / "cache2")
    stats = lambda: mounts.read_stats(info.mountpoint)  # noqa: E731
    _wait(lambda: stats()["names"]["done"] == len(prof.names) and not stats()["names"]["running"])
    before = stats()["fuse"]["ops"]
    subprocess.run([sys.executable, "-c", f"import os; m = {info.mountpoint!r}; os.listdir(m + '/bin');"
                    "[os.path.lexists(m + '/' + n) for n in ('etc/passwd', 'etc/missing', 'bin/sh', 'a')]"],
                   check=True, timeout=60)  # another process, as a container would be
    after = stats()["fuse"]["ops"]
    for op in ("lookup", "readdir"):
        assert after[op]["count"] == before[op]["count"], op
    human = subprocess.run([sys.executable, "-m", "tools.cli", "stats", info.mountpoint],
                           capture_output=True, text=True, timeout=60).stdout
    assert f"names     {len(prof.names)} of the profile's {len(prof.names)} looked up or listed ahead" in human


def test_unmount_stops_the_name_worker(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    store, image_id = _image(tmp_path)
    names = [("l", f"/etc/absent-{i}") for i in range(50_000)]
    digest = profiles.save(store, profiles.Profile(image_id, [], names=names), None)
    info = mounter.mount(f"file://{tmp_path}/store", image_id, profile=digest)
    _wait(lambda: mounts.read_stats(info.mountpoint)["names"]["running"])
    worker = subprocess.run(["pgrep", "-f", f"warm_worker.py {info.mountpoint}"], capture_output=True, text=True)
    assert worker.stdout.strip(), "no name worker running"
    t = time.monotonic()
    mounter.unmount(info)
    assert time.monotonic() - t < 5 and not mounts.daemon_alive(info.pid)
    _wait(lambda: not subprocess.run(["pgrep", "-f", f"warm_worker.py {info.mountpoint}"],
                                     capture_output=True).stdout, timeout=5)


# -- the pack pushed into the page cache ------------------------------------------------------------
def test_push_plan_maps_pack_parts_to_page_aligned_runs_of_the_profile_s_files(tmp_path: Path) -> None:
    from imagefs.fs import push

    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    rng = random.Random(5)
    (root / "d/big").write_bytes(rng.randbytes(3 * MB + 1000))  # its last page is short
    (root / "d/copy").write_bytes((root / "d/big").read_bytes())  # the same chunks, another file
    (root / "small").write_bytes(b"s" * 100)
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(root))
    index = load_index(store, image_id)
    big = index.inode(index.resolve("/d/big"))
    ext = big.extents or []
    pieces = [(index.chunks[ext[i]], ext[i + 1], ext[i + 2]) for i in range(0, len(ext), 3)]
    # Two segments: the file's first 100,000 bytes and then the rest (split inside a page).
    first_chunk, first_off, first_len = pieces[0]
    seg1 = ("1" * 64, 100_000, [(first_chunk, first_off, 100_000, 0)])
    rest = [(first_chunk, first_off + 100_000, first_len - 100_000, 0)] + [(c, o, n, 0) for c, o, n in pieces[1:]]
    seg2 = ("2" * 64, big.size - 100_000, rest)
    names = [("d", "/d"), ("l", "/d/big"), ("l", "/missing"), ("l", "/d")]
    plan = push.plan(index, names, [seg1, seg2])  # type: ignore[list-item]
    assert [s for s, _ in plan] == ["1" * 64, "2" * 64]
    (r1,), runs2 = plan[0][1], plan[1][1]
    big_ino = index.resolve("/d/big")
    assert (r1.ino, r1.start, r1.length) == (big_ino, 0, 100_000 // 4096 * 4096)
    assert len(runs2) == 1 and runs2[0].start == -(-100_000 // 4096) * 4096
    assert runs2[0].start + runs2[0].length == big.size  # the short last page is pushed
    data = (root / "d/big").read_bytes()
    for run in (r1, runs2[0]):
        got = b"".join(_chunk_bytes(store, c)[o:o + n] for c, o, n in run.pieces)
        assert got == data[run.start:run.start + run.length]
    # Files not among the names get nothing, though they share the chunks.
    assert all(r.ino == big_ino for _, runs in plan for r in runs)


def _chunk_bytes(store: LocalStore, digest: str) -> bytes:
    from imagefs import chunks as blobs

    return blobs.decode(store.get(blobs.chunk_key(digest)), digest)


def test_store_runs_hands_unknown_inodes_back_and_counts_the_rest() -> None:
    import errno

    from imagefs.fs import push

    calls = []

    def notify(ino: int, off: int, data: bytes) -> None:
        if ino == 7:
            raise OSError(errno.ENOENT, "not known")
        calls.append((ino, off, data))

    runs = [push.Run(5, 0, (("a" * 64, 0, 3), ("b" * 64, 0, 2))), push.Run(7, 4096, (("a" * 64, 0, 3),))]
    stats = push.PushStats()
    later = push.store_runs([(runs[0], [b"abc", b"de"]), (runs[1], [b"xyz"])], notify, stats, push.Gate())
    assert calls == [(5, 0, b"abcde")] and later == [(runs[1], [b"xyz"])] and (stats.runs, stats.bytes) == (1, 5)

    def broken(ino: int, off: int, data: bytes) -> None:
        raise OSError(errno.ENOSYS, "no notify_store")

    try:
        push.store_runs([(runs[0], [b"abc", b"de"])], broken, stats, push.Gate())
    except OSError as e:
        assert e.errno == errno.ENOSYS
    else:
        raise AssertionError("ENOSYS was swallowed")
    gate = push.Gate()
    assert gate.close(timeout=0.1)
    assert push.store_runs([(runs[0], [b"abc", b"de"])], notify, stats, gate) == [] and len(calls) == 1


def test_a_profile_s_pack_is_pushed_into_the_page_cache(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Record a start-up that reads part of /c and all of /a; a mount with that profile hands the
    pack to the kernel as it arrives, so the same reads in another process then reach the daemon
    for no more than the few pages at the pack's edges, and return the right bytes."""
    store, image_id = _image(tmp_path)
    url = f"file://{tmp_path}/store"
    src = {n: _file_bytes(store, image_id, "/" + n) for n in ("a", "c")}

    first = mounter.mount(url, image_id, cache_dir=tmp_path / "cache1")
    want = _startup(Path(first.mountpoint))
    assert want == src["c"][3 * MB:5 * MB] + src["a"]
    prof = profiles.from_trace(image_id, mounts.read_trace(first.mountpoint))
    mounter.unmount(first)
    digest = profiles.save(store, prof, None)
    info = mounter.mount(url, image_id, profile=digest, cache_dir=tmp_path / "cache2")
    stats = lambda: mounts.read_stats(info.mountpoint)  # noqa: E731
    _wait(lambda: stats()["pushed"]["runs"] > 0 and not stats()["pushed"]["running"])
    s = stats()
    assert s["pushed"]["bytes"] >= 12 * MB - 8 * 4096 and s["pushed"]["dropped"] == 0
    before = s["fuse"]["read_bytes"]
    out = subprocess.run([sys.executable, "-c", f"import sys; m = {info.mountpoint!r}\n"
                          "f = open(m + '/c', 'rb'); f.seek(3 << 20); part = f.read(2 << 20)\n"
                          "sys.stdout.buffer.write(part + open(m + '/a', 'rb').read())"],
                         capture_output=True, check=True, timeout=60).stdout
    assert out == want
    assert stats()["fuse"]["read_bytes"] - before <= 64 * 4096  # only pages at the pack's edges
    # The rest of the file is right too (what was not pushed is read as usual).
    assert (Path(info.mountpoint) / "c").read_bytes() == src["c"]
    human = subprocess.run([sys.executable, "-m", "tools.cli", "stats", info.mountpoint],
                           capture_output=True, text=True, timeout=60).stdout
    assert "pushed    " in human


def _file_bytes(store: LocalStore, image_id: str, path: str) -> bytes:
    index = load_index(store, image_id)
    ext = index.inode(index.resolve(path)).extents or []
    return b"".join(_chunk_bytes(store, index.chunks[ext[i]])[ext[i + 1]:ext[i + 1] + ext[i + 2]]
                    for i in range(0, len(ext), 3))
