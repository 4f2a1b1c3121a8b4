"""Copying trees that clients name, as root, without leaving the allowed roots.

The daemon runs as root and copies ``sourcePath`` and ``targetPath`` that a
client chose, so a path check followed by an ordinary copy would race: a
component swapped for a symlink between the check and the open would lead
anywhere. Every open here is relative to a directory fd and refuses to
follow a symlink (O_NOFOLLOW), starting from the allowed root itself, so the
check and the use are the same system call. A client-named path must not be
a symlink itself; symlinks inside a copied tree are copied as symlinks and
never followed, and never replace a file. Device files, sockets and fifos
are refused, because copying one as root would read a device or block on a
pipe.
"""

import errno
import os
import stat

from epm_server.errors import (
    FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, shown)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the lstat must not block the open.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Mode bits kept on copies: no setuid, setgid or sticky from a client's file.
_MODE_MASK = 0o777
_MAX_DEPTH = 64
_CHUNK = 1 << 20


def kind_of(mode):
    """A file type in words, for messages."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


class AllowedRoots:
    """The directories under which clients may name source and target paths."""

    def __init__(self, roots, private=()):
        # The operator's roots are trusted: resolve their own symlinks once.
        self.roots = tuple(os.path.realpath(r) for r in roots)
        # The daemon's own data (cache root, database): never a source, so no
        # client can copy the database out, and never a target.
        self.private = tuple(os.path.realpath(p) for p in private)

    def open_parent(self, path, field):
        """Open the directory holding ``path``; return (dir fd, last name).

        ``path`` must be absolute, have no ``..`` component and lie strictly
        under an allowed root; each directory on the way is opened without
        following symlinks. Raises InvalidArgument, PermissionDenied,
        NotFound.
        """
        if not path or not os.path.isabs(path):
            raise InvalidArgument(f"{field}: expected an absolute path, got {shown(path, quoted=True)}")
        parts = [p for p in path.split("/") if p and p != "."]
        if ".." in parts:
            raise InvalidArgument(f"{field}: {shown(path, quoted=True)} has a '..' component")
        clean = "/" + "/".join(parts)
        for private in self.private:
            if _under(clean, private) or _under(private, clean) or clean == private:
                raise PermissionDenied(f"{field}: {shown(path)} overlaps the daemon's own "
                                       f"data ({private})")
        for root in self.roots:
            rest = _under(clean, root)
            if rest:
                return self._walk(root, rest, path, field)
        if not self.roots:
            raise PermissionDenied(f"{field}: {shown(path)} is refused: no allowed roots "
                                   "are configured ([bundle] allowed_roots)")
        raise PermissionDenied(f"{field}: {shown(path)} is not under an allowed root "
                               f"({', '.join(self.roots)})")

    def _walk(self, root, rest, path, field):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in rest[:-1]:
                try:
                    child = os.open(name, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    raise NotFound(f"{field}: {shown(path)} does not exist") from None
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PermissionDenied(f"{field}: {shown(path)} passes through a "
                                               "symlink or a non-directory") from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, rest[-1]


def _under(path, root):
    """The components of ``path`` below ``root``, or [] when not strictly under."""
    if root == "/":
        return path.split("/")[1:] if path != "/" else []
    if path.startswith(root + "/"):
        return path[len(root) + 1:].split("/")
    return []


def lstat_at(dir_fd, name):
    """os.lstat relative to ``dir_fd``; None when the name does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def copy_in(src_dir, name, dst_dir, dst_name, field, shown):
    """Copy a client's file or directory ``name`` to a new ``dst_name``.

    The path's last component must not be a symlink: the client names what
    is saved, never a link to it (a saved link to ``/etc`` would later be
    loaded as one). Returns the bytes of regular files copied. Raises
    NotFound, InvalidArgument naming ``field``.
    """
    st = lstat_at(src_dir, name)
    if st is None:
        raise NotFound(f"{field}: {shown} does not exist")
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{field}: {shown} is a symlink; name the file or "
                              "directory itself")
    return _copy(src_dir, name, st, dst_dir, dst_name, field, shown, 0,
                 replace=False)


def copy_out(src_dir, name, dst_dir, dst_name, field, shown):
    """Copy a cache's data ``name`` to a client's ``dst_name``.

    ``dst_name`` must not exist, or be a directory that a directory's
    content is merged into: an existing file or symlink is refused, never
    replaced. Returns the bytes of regular files copied. Raises
    InvalidArgument naming ``field``, FailedPrecondition when the cache's
    data is not a file or directory.
    """
    st = lstat_at(src_dir, name)
    if st is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        what = "missing" if st is None else f"a {kind_of(st.st_mode)}"
        raise FailedPrecondition(f"the cache's data is {what}; delete the cache")
    existing = lstat_at(dst_dir, dst_name)
    if existing is not None and not stat.S_ISDIR(existing.st_mode):
        raise InvalidArgument(f"{field}: {shown} exists and is a "
                              f"{kind_of(existing.st_mode)}; LoadCache creates a "
                              "new path or merges into a directory")
    if existing is not None and not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{field}: {shown} is a directory; a single-file "
                              "cache is loaded to a new path")
    return _copy(src_dir, name, st, dst_dir, dst_name, field, shown, 0,
                 replace=False)


def _copy(src_dir, name, st, dst_dir, dst_name, field, shown, depth, replace=True):
    """Copy ``name``, whose lstat is ``st``, to ``dst_name``; return bytes.

    Files are fsynced, and so is every directory once filled. An existing
    directory at the destination is merged into. With ``replace``, an
    existing file or symlink gives way to a file, and a symlink to a
    symlink; a symlink never replaces a file. Raises InvalidArgument for a
    special file, a type conflict at the destination or a tree deeper than
    64 levels.
    """
    if depth > _MAX_DEPTH:
        raise InvalidArgument(f"{field}: {shown} is nested deeper than "
                              f"{_MAX_DEPTH} directories")
    if stat.S_ISDIR(st.st_mode):
        return _copy_dir(src_dir, name, dst_dir, dst_name, field, shown, depth)
    if stat.S_ISREG(st.st_mode):
        return _copy_file(src_dir, name, dst_dir, dst_name, field, shown, replace)
    if stat.S_ISLNK(st.st_mode) and depth > 0:
        # Copied as a link and never followed: every later open here is
        # O_NOFOLLOW from a directory fd, so it cannot lead a load outside.
        target = os.readlink(name, dir_fd=src_dir)
        existing = lstat_at(dst_dir, dst_name)
        if existing is not None:
            if not stat.S_ISLNK(existing.st_mode):
                raise InvalidArgument(f"{field}: {shown} is a symlink and would "
                                      f"replace a {kind_of(existing.st_mode)}")
            os.unlink(dst_name, dir_fd=dst_dir)
        try:
            os.symlink(target, dst_name, dir_fd=dst_dir)
        except FileExistsError:
            raise _appeared(field, shown) from None
        return 0
    raise InvalidArgument(f"{field}: {shown} is a {kind_of(st.st_mode)}; only "
                          "files, directories and symlinks inside them are copied")


def _copy_dir(src_dir, name, dst_dir, dst_name, field, shown, depth):
    src = _open_dir(name, src_dir, field, shown)
    try:
        mode = os.fstat(src).st_mode & _MODE_MASK
        existing = lstat_at(dst_dir, dst_name)
        if existing is None:
            try:
                os.mkdir(dst_name, mode | 0o700, dir_fd=dst_dir)
            except FileExistsError:
                raise _appeared(field, shown) from None
        elif not stat.S_ISDIR(existing.st_mode):
            raise InvalidArgument(f"{field}: {shown} is a directory but the "
                                  f"target is a {kind_of(existing.st_mode)}")
        dst = _open_dir(dst_name, dst_dir, field, shown)
        try:
            size = 0
            for child in sorted(os.listdir(src)):
                child_st = lstat_at(src, child)
                if child_st is None:
                    raise NotFound(f"{field}: {shown}/{child} vanished while "
                                   "being copied")
                size += _copy(src, child, child_st, dst, child, field,
                              f"{shown}/{child}", depth + 1)
            os.fchmod(dst, mode)
            os.fsync(dst)
            return size
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_file(src_dir, name, dst_dir, dst_name, field, shown, replace):
    try:
        src = os.open(name, _READ, dir_fd=src_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _changed(field, shown, "symlink") from None
        raise
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise _changed(field, shown, kind_of(st.st_mode))
        if replace:
            _clear(dst_dir, dst_name, field, shown)
        try:
            dst = os.open(dst_name, _CREATE, st.st_mode & _MODE_MASK,
                          dir_fd=dst_dir)
        except FileExistsError:
            raise _appeared(field, shown) from None
        try:
            offset = 0
            while True:
                sent = os.sendfile(dst, src, offset, _CHUNK)
                if sent == 0:
                    break
                offset += sent
            os.fsync(dst)
            return offset
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _open_dir(name, dir_fd, field, shown):
    """Open a directory entry, refusing one that turned into something else."""
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _changed(field, shown, "symlink or a file") from None
        raise


def _changed(field, shown, kind):
    return InvalidArgument(f"{field}: {shown} changed into a {kind} while "
                           "being copied")


def _appeared(field, shown):
    return InvalidArgument(f"{field}: {shown} appeared while being copied")


def _clear(dst_dir, dst_name, field, shown):
    """Remove a file or symlink in the way of a copy; refuse to replace a dir."""
    existing = lstat_at(dst_dir, dst_name)
    if existing is None:
        return
    if stat.S_ISDIR(existing.st_mode):
        raise InvalidArgument(f"{field}: {shown} would replace a directory")
    os.unlink(dst_name, dir_fd=dst_dir)


def remove_tree(dir_fd, name):
    """Remove ``name`` and everything below it, never following a symlink."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_tree(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
