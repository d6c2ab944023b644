/* A large json file written over its folder's spare, in one call that lets go of the GIL.
 *
 * chanstore/backends/spare_files.py says what a spare is and why, and holds
 * the same steps in Python. Written there, each of a file's dozen system calls
 * gives the GIL back and takes it again, and in the daemon the event loop holds
 * it half the time: four 100 KB files written beside a thread that ran Python
 * half the time went at half the rate of four written alone. Here the whole
 * write is one wait for the GIL.
 *
 * replace(folder, spare, temp, name, data) -> (step, errno, spare_used)
 *
 * step is DONE, or the step that failed with errno (nothing is left behind
 * then but what the step says): CREATE (the temporary file), WRITE (writing or
 * flushing it), LINK (a symbolic link at name: errno 0), RENAME (putting it in
 * name's place; EISDIR for anything but a file there), FOLDER (flushing the folder;
 * the new version is in place).
 * Off Linux, every call answers UNSUPPORTED and the Python form is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum step { DONE = 0, CREATE = 1, WRITE = 2, LINK = 3, RENAME = 4, FOLDER = 5, UNSUPPORTED = 6 };

#ifdef __linux__

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static int
exchange(int folder, const char *first, const char *second)
{
#ifdef SYS_renameat2
    return (int)syscall(SYS_renameat2, folder, first, folder, second, RENAME_EXCHANGE);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* The spare, taken under temp, open for writing over if nobody else can see it; else -1
 * (and a spare that may not be written over is removed). */
static int
open_spare(int folder, const char *spare, const char *temp, struct stat *info)
{
    if (renameat(folder, spare, folder, temp) != 0)
        return -1; /* none */
    int fd = openat(folder, temp, O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
        /* One link and no other open file: a write lease is granted only then. */
        if (fstat(fd, info) == 0 && S_ISREG(info->st_mode) && info->st_nlink == 1
            && fcntl(fd, F_SETLEASE, F_WRLCK) == 0)
            return fd;
        close(fd);
    }
    if (unlinkat(folder, temp, 0) != 0)
        renameat(folder, temp, folder, spare); /* a folder in its place: left alone */
    return -1;
}

static int
write_whole(int fd, const char *data, Py_ssize_t size)
{
    Py_ssize_t done = 0;
    while (done < size) {
        ssize_t written = pwrite(fd, data + done, (size_t)(size - done), (off_t)done);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        done += written;
    }
    return 0;
}

/* Write data over what fd holds (size bytes before: old_size), flush it, close fd;
 * 0, or -1 with errno set. */
static int
fill(int fd, const char *data, Py_ssize_t size, off_t old_size, int spare)
{
    int failed = write_whole(fd, data, size);
    if (!failed && old_size > size)
        failed = ftruncate(fd, (off_t)size);
    /* A spare's blocks were allocated: its data, and a new size, is what to flush. */
    if (!failed)
        failed = spare ? fdatasync(fd) : fsync(fd);
    int error = errno;
    close(fd); /* lets go of a spare's lease too */
    errno = error;
    return failed ? -1 : 0;
}

/* Write, flush, and put in name's place; the step that failed, errno in *code. */
static int
replace_in(int folder, const char *spare, const char *temp, const char *name,
           const char *data, Py_ssize_t size, int *code, int *used)
{
    struct stat info;
    int fd = open_spare(folder, spare, temp, &info);
    *used = fd >= 0 && fill(fd, data, size, info.st_size, 1) == 0;
    if (fd >= 0 && !*used)
        unlinkat(folder, temp, 0); /* a new file is written instead: it says why if it fails */
    if (!*used) {
        fd = openat(folder, temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0) {
            *code = errno;
            return CREATE;
        }
        if (fill(fd, data, size, 0, 0) != 0) {
            *code = errno;
            unlinkat(folder, temp, 0);
            return WRITE;
        }
    }
    struct stat there;
    if (fstatat(folder, name, &there, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(there.st_mode)) {
        /* A link was planted, a folder is foreign: either is left for a person to look
         * at (an exchange would move it aside, where a rename fails). */
        unlinkat(folder, temp, 0);
        *code = S_ISLNK(there.st_mode) ? 0 : EISDIR;
        return S_ISLNK(there.st_mode) ? LINK : RENAME;
    }
    /* Exchanged, temp holds the version replaced (the spare, once the folder is flushed). */
    int exchanged = exchange(folder, temp, name) == 0;
    if (!exchanged) {
        int refused = errno;
        /* No version yet, or no exchange on this file system: a plain rename. */
        int plain = refused == ENOENT || refused == EINVAL || refused == ENOSYS
                    || refused == EPERM;
        if (!plain || renameat(folder, temp, folder, name) != 0) {
            *code = plain ? errno : refused;
            unlinkat(folder, temp, 0);
            return RENAME;
        }
    }
    if (fsync(folder) != 0) {
        *code = errno;
        if (exchanged)
            unlinkat(folder, temp, 0);
        return FOLDER;
    }
    /* Only now may the version replaced be written over: until the exchange was on
     * disk, a crash could have left it the key's file there. */
    if (exchanged && renameat(folder, temp, folder, spare) != 0)
        unlinkat(folder, temp, 0);
    return DONE;
}

#endif /* __linux__ */

static PyObject *
replace(PyObject *module, PyObject *args)
{
    int folder;
    const char *spare, *temp, *name;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iyyyy*:replace", &folder, &spare, &temp, &name, &data))
        return NULL;
    int step = UNSUPPORTED, code = 0, used = 0;
#ifdef __linux__
    Py_BEGIN_ALLOW_THREADS
    step = replace_in(folder, spare, temp, name, data.buf, data.len, &code, &used);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&data);
    return Py_BuildValue("(iiO)", step, code, used ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"replace", replace, METH_VARARGS,
     "replace(folder, spare, temp, name, data) -> (step, errno, spare_used)\n\n"
     "Write data as name in the folder (a descriptor) over its spare, or into a new file\n"
     "temp, flushed; put it in name's place, the version replaced becoming the spare;\n"
     "flush the folder. step is 0 when done, else the step that failed (see the source)."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_spare_files",
    "A large json file written over its folder's spare without the GIL.", 0, methods, slots,
};

PyMODINIT_FUNC
PyInit__spare_files(void)
{
    return PyModuleDef_Init(&module_def);
}
