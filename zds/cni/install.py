"""``zds cni install`` / ``zds cni uninstall``, as Istio's install-cni does it.

Install puts the ``zds-cni`` executable into a CNI bin dir and chains zds-cni
into a network's config list in a CNI conf dir: the network named with
``--network``, else the primary one (the lexically first valid config, the one
kubelet and CRI runtimes use). zds-cni's entry goes last in ``plugins``; the
rest of the file stays byte for byte as it was. A single-plugin ``.conf`` is
turned into a ``.conflist`` holding it and zds-cni (as Istio does); the
original is kept beside it (``NAME.conf.zds-cni-orig``, which no runtime
reads) and put back by uninstall. Every write is atomic (a temporary file in
the same directory, then rename) and keeps the file's mode and owner. Running
install again changes nothing that is already right.

The executable is a small launcher: a Python script whose first line is the
interpreter zds is installed with, which runs ``zds.cni.plugin``. It keeps
working from wherever it is copied, as long as that zds installation stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from zds import defaults
from zds.cni import spec
from zds.cni.conflist import Conflist, ConflistError
from zds.cni.launcher import InstallError, check_launcher, check_python, is_ours, launcher

#: Beside a .conf that install turned into a .conflist: the original, for uninstall.
ORIGINAL_SUFFIX = ".zds-cni-orig"
CONF_EXTENSIONS = (".conf", ".conflist")


@dataclass
class InstallOptions:
    bin_dir: str = defaults.CNI_BIN_DIR
    conf_dir: str = defaults.CNI_CONF_DIR
    #: The network to chain into (its config's ``name``); None: the primary one.
    network: str | None = None
    #: These three, when None (not given): what the network's zds-cni entry has, else the default.
    cni_socket: str | None = None
    log_file: str | None = None
    #: "labelled" (the container's labels decide) or "all".
    enroll: str | None = None
    #: The interpreter the launcher runs (the one zds is installed with).
    python: str = field(default_factory=lambda: sys.executable)


#: The keys of zds-cni's entry install sets from its options (the others are the operator's).
ENTRY_KEYS = ("type", "cni_socket", "log_file", "enroll")


def plugin_entry(options: InstallOptions, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """zds-cni's entry: what ``options`` give, else what the ``existing`` entry has (a
    reinstall with no flags changes nothing: it had switched an ``all`` network to labelled,
    a custom socket to the default), else the defaults; the keys install does not set
    (``timeout``, ``log_level``, set by hand) kept. InstallError if it would not load."""
    existing = existing or {}
    entry: dict[str, Any] = {"type": defaults.CNI_PLUGIN_TYPE}
    if options.cni_socket or "cni_socket" in existing or not existing.get("cni_agent_run_dir"):
        # (an entry naming Istio's cni_agent_run_dir instead keeps it: its socket is there)
        entry["cni_socket"] = options.cni_socket or existing.get("cni_socket", defaults.CNI_SOCKET)
    entry["log_file"] = options.log_file or existing.get("log_file", defaults.CNI_PLUGIN_LOG)
    enroll = options.enroll or existing.get("enroll", "labelled")
    if enroll != "labelled":
        entry["enroll"] = enroll
    entry |= {k: v for k, v in existing.items() if k not in ENTRY_KEYS}
    from zds.cni.plugin import PluginConfig
    from zds.cni.spec import CniError

    try:
        PluginConfig(entry)
    except CniError as exc:
        raise InstallError(
            f"zds-cni's entry would not load: {exc}; correct it (or remove it) and install again"
        ) from exc
    return entry


def write_atomically(
    path: str, data: str, *, mode: int | None = None, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data`` in one rename, keeping its mode and owner (``mode`` and
    ``owner`` for a new file); a symlink stays one: the file it points to is replaced. The
    directory is synced after the rename (a crash then cannot bring the old file back)."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path) or "."
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp.")
    try:
        with os.fdopen(fd, "w", newline="") as f:  # (the text's own line ends, CRLF too)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, mode if mode is not None else 0o644)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.chown(tmp, *owner)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # (a filesystem that cannot sync a directory: as before)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: str) -> str:
    try:
        with open(path, newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read {path}: {_why(exc)}") from exc


def _why(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    return exc.strerror or str(exc)


def config_files(conf_dir: str) -> list[str]:
    """The network configs in ``conf_dir``, in the order runtimes read them."""
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        raise InstallError(
            f"CNI conf dir {conf_dir} does not exist; give the right one with --conf-dir"
        ) from None
    return [os.path.join(conf_dir, n) for n in names if os.path.splitext(n)[1] in CONF_EXTENSIONS]


def _load(path: str, skipped: list[str]) -> Conflist | dict[str, Any] | None:
    """A conflist, a single-plugin .conf (its document), or None for a file that is neither;
    one that cannot be read (a dangling symlink, not UTF-8) is skipped, as Istio's
    install-cni and libcni skip it, and said in ``skipped``."""
    try:
        with open(path, newline="") as f:  # its line ends as they are: uninstall gives the bytes back
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        skipped.append(f"skipped {path}, which cannot be read: {_why(exc)}")
        return None
    if path.endswith(".conflist"):
        try:
            conflist = Conflist(text, path)
        except ConflistError:
            return None
        return conflist if conflist.plugins else None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("type"), str) else None


def _target(options: InstallOptions, skipped: list[str]) -> tuple[str, Conflist | dict[str, Any]]:
    for path in config_files(options.conf_dir):
        loaded = _load(path, skipped)
        if loaded is None:
            continue
        name = loaded.name if isinstance(loaded, Conflist) else str(loaded.get("name", ""))
        if options.network is None or name == options.network:
            return path, loaded
    unread = "".join(f"; {line}" for line in skipped)
    if options.network is not None:
        raise InstallError(
            f"no network named {options.network!r} in {options.conf_dir} "
            f"(podman network ls lists Podman's; the name is the config's \"name\"){unread}"
        )
    raise InstallError(
        f"no network config in {options.conf_dir} to chain zds-cni into; create the network first "
        f"(e.g. podman network create), or point --conf-dir at the runtime's{unread}"
    )


def install_binary(options: InstallOptions) -> tuple[str, bool]:
    """The launcher in the bin dir: (its path, whether it was written)."""
    if not os.path.isdir(options.bin_dir):
        raise InstallError(f"CNI bin dir {options.bin_dir} does not exist; give the right one with --bin-dir")
    path = os.path.join(options.bin_dir, defaults.CNI_PLUGIN_TYPE)
    content = launcher(options.python)
    if os.path.isfile(path) and _read(path) == content and os.access(path, os.X_OK):
        return path, False
    if os.path.exists(path) and not is_ours(path):
        raise InstallError(f"{path} exists and is not zds-cni's launcher; remove it or use another --bin-dir")
    write_atomically(path, content, mode=0o755)
    return path, True


def chain(
    options: InstallOptions, target: tuple[str, Conflist | dict[str, Any]] | None = None
) -> tuple[str, bool]:
    """zds-cni last in the target network's plugins (``target``: found already, else here):
    (the file, whether it was written)."""
    path, loaded = target or _target(options, [])
    if isinstance(loaded, dict):
        return _convert_conf(path, loaded, plugin_entry(options)), True
    ours = loaded.indices_of(defaults.CNI_PLUGIN_TYPE)
    if ours and len(ours) == len(loaded.plugins):
        raise InstallError(
            f"{path}: network {loaded.name!r} has no plugin but zds-cni, which chains after a "
            "network's own (bridge, ...); give it its plugins, or chain into another with --network"
        )
    existing = loaded.plugins[ours[-1]] if ours else None
    entry = plugin_entry(options, existing if isinstance(existing, dict) else None)
    if ours == [len(loaded.plugins) - 1] and loaded.plugins[-1] == entry:
        return path, False
    conflist = loaded
    for index in reversed(ours):
        conflist = Conflist(conflist.without(index), path)
    write_atomically(path, conflist.appended(entry))
    return path, True


def _convert_conf(path: str, conf: dict[str, Any], entry: dict[str, Any]) -> str:
    """A .conf becomes NAME.conflist holding it and zds-cni; the original is kept aside."""
    target = os.path.splitext(path)[0] + ".conflist"
    if os.path.exists(target):
        raise InstallError(
            f"{path} is a single-plugin config and {target} exists already; chain into that one"
        )
    if os.path.lexists(path + ORIGINAL_SUFFIX):  # (the rename below would replace it: not ours to lose)
        raise InstallError(
            f"{path} is a single-plugin config and {path + ORIGINAL_SUFFIX} exists already (an earlier "
            "install's original, kept); move it away, then install again; nothing was changed"
        )
    plugin = {k: v for k, v in conf.items() if k != "cniVersion"}
    doc = {
        "cniVersion": conf.get("cniVersion", "0.3.1"),
        "name": conf.get("name", ""),
        "plugins": [plugin, entry],
    }
    st = os.stat(path)  # (the conflist made from it is theirs as the .conf was: mode and owner)
    write_atomically(
        target, json.dumps(doc, indent=2) + "\n", mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid)
    )
    try:
        os.rename(path, path + ORIGINAL_SUFFIX)
    except OSError:
        os.unlink(target)  # both would be read as configs of one network: none of it, then
        raise
    return target


def _check_version(path: str, loaded: Conflist | dict[str, Any]) -> None:
    """A network whose cniVersion zds-cni refuses is not chained: every ADD on it would fail."""
    version = (loaded.doc if isinstance(loaded, Conflist) else loaded).get("cniVersion")
    if version is not None and version not in spec.SUPPORTED_VERSIONS:
        raise InstallError(
            f"{path} has cniVersion {version!r}, which zds-cni does not speak (it speaks "
            f"{', '.join(spec.SUPPORTED_VERSIONS)}): every container on it would fail to start; "
            "nothing was changed"
        )


def install(options: InstallOptions) -> list[str]:
    """Install and chain; what was done, one line each. Nothing is written when the network
    to chain into cannot be found or read (InstallError)."""
    done: list[str] = []
    target = _target(options, done)
    _check_version(*target)
    check_python(options.python)
    existed = os.path.lexists(os.path.join(options.bin_dir, defaults.CNI_PLUGIN_TYPE))
    binary, written = install_binary(options)
    done.append(f"{'installed' if written else 'up to date:'} {binary}")
    try:
        check_launcher(binary)
        conf, changed = chain(options, target)
    except (OSError, InstallError) as exc:  # nothing of this install stays
        if written and not existed:
            os.unlink(binary)
        if isinstance(exc, InstallError):
            raise
        raise InstallError(
            f"cannot chain zds-cni into {target[0]}: {exc.strerror}; nothing was chained"
        ) from exc
    done.append(f"{'chained zds-cni into' if changed else 'already chained, unchanged:'} {conf}")
    return done


def uninstall(options: InstallOptions) -> list[str]:
    """Take zds-cni out of the configs in the conf dir (only the network named
    ``options.network``, when given) and remove the launcher unless a network still chains
    zds-cni; what was done, one line each."""
    done: list[str] = []
    skipped: list[str] = []
    still: list[str] = []  # networks that keep zds-cni (not the one named)
    for path in config_files(options.conf_dir):
        loaded = _load(path, skipped)
        if not isinstance(loaded, Conflist) or not loaded.indices_of(defaults.CNI_PLUGIN_TYPE):
            continue
        if options.network is not None and loaded.name != options.network:
            still.append(f"{loaded.name!r} ({path})")
            continue
        if len(loaded.indices_of(defaults.CNI_PLUGIN_TYPE)) == len(loaded.plugins):
            # (not install's: it chains after a network's own; libcni refuses an empty list)
            done.append(f"left {path} as it is: zds-cni is its only plugin")
            still.append(f"{loaded.name!r} ({path})")
            continue
        _unchain(path, loaded, done)
    if options.network is not None and not done:
        done.append(f"zds-cni is not chained into a network named {options.network!r} in {options.conf_dir}")
    path = os.path.join(options.bin_dir, defaults.CNI_PLUGIN_TYPE)
    if os.path.exists(path):
        if not is_ours(path):
            # Another program's, not zds's to remove: said, and what was done still is (it was
            # an error that hid the configs restored before it, and failed every uninstall after).
            done.append(f"left {path} in place: it is not zds-cni's launcher")
        elif still:  # the runtime would fail every ADD of those networks without it
            done.append(f"kept {path}: zds-cni is still chained into {', '.join(still)}")
        else:
            os.unlink(path)
            done.append(f"removed {path}")
    return skipped + (done or ["nothing to do: zds-cni was not installed"])


def _unchain(path: str, loaded: Conflist, done: list[str]) -> None:
    """zds-cni's entries out of one conflist, or the .conf install converted back."""
    conflist = loaded
    for index in reversed(loaded.indices_of(defaults.CNI_PLUGIN_TYPE)):
        conflist = Conflist(conflist.without(index), path)
    original = os.path.splitext(path)[0] + ".conf" + ORIGINAL_SUFFIX
    conf = original.removesuffix(ORIGINAL_SUFFIX)
    restorable = os.path.exists(original) and _restorable(conflist, original)
    try:
        if restorable and not os.path.lexists(conf):
            _restore(original, conf, path)
            done.append(f"restored {conf} (removed {path})")
            return
        write_atomically(path, conflist.text)
    except OSError as exc:  # (the CLI prints this one line; what came before it was done)
        raise InstallError(
            f"cannot take zds-cni out of {path}: {exc.strerror}; that file is left as it was"
            + "".join(f"; {line}" for line in done)
        ) from exc
    # A .conf written there since the install is someone else's, and stays.
    kept = f" ({conf} exists again: {original} not restored)" if restorable else ""
    if not restorable and os.path.exists(original):  # (the .conflist is the truth now)
        kept = f" ({original} kept: {path} was edited since the install)"
    done.append(f"took zds-cni out of {path}{kept}")


def _restore(original: str, conf: str, conflist: str) -> None:
    """The kept .conf back, the .conflist made from it gone: both or neither (with both, a
    runtime reads two configs of one network)."""
    os.rename(original, conf)
    try:
        os.unlink(conflist)
    except OSError:
        os.rename(conf, original)
        raise


def _restorable(conflist: Conflist, original: str) -> bool:
    """The conflist is still just the original .conf (nobody edited it since)."""
    try:
        conf = json.loads(_read(original))
    except ValueError:
        return False
    plugin = {k: v for k, v in conf.items() if k != "cniVersion"}
    return bool(conflist.plugins == [plugin] and conflist.name == conf.get("name", ""))
