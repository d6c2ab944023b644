/* A round of commands to Redis, encoded in RESP with its large values left uncopied.
 *
 *   packed(commands, large_bytes) -> [bytes, ...]
 *       Each command (a sequence of arguments, its name first) as a RESP array
 *       of bulk strings: the pieces to write, in order. A `bytes` argument of
 *       `large_bytes` or more is a piece of its own, the caller's object itself;
 *       everything between two such values is joined into one piece.
 *
 * chanstore/backends/redis_rounds.py says why a round is encoded apart from
 * redis-py, and holds the same encoding in Python (hiredis's pack_command for
 * the small arguments). This gives the same bytes in the same pieces, and
 * takes the arguments hiredis takes: bytes, str (as UTF-8), memoryview, int
 * (not bool) and float (both as their repr). A round of seven 100 KB writes
 * took 138 us to encode in Python, 8.5 us here; sixteen small script calls
 * 99 and 19 us (bench/redis_rounds.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

/* The piece being put together: bytes that Python does not see until it is done. */
typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
} Piece;

static int
reserve(Piece *piece, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX - piece->length) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t needed = piece->length + more;
    if (needed <= piece->capacity) {
        return 0;
    }
    Py_ssize_t capacity = piece->capacity > 0 ? piece->capacity : 512;
    while (capacity < needed) {
        capacity = capacity > PY_SSIZE_T_MAX / 2 ? needed : capacity * 2;
    }
    char *data = PyMem_Realloc(piece->data, (size_t)capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    piece->data = data;
    piece->capacity = capacity;
    return 0;
}

static int
put(Piece *piece, const char *text, Py_ssize_t length)
{
    if (reserve(piece, length) < 0) {
        return -1;
    }
    memcpy(piece->data + piece->length, text, (size_t)length);
    piece->length += length;
    return 0;
}

/* "*3\r\n" or "$5\r\n": a RESP header of `kind` for a count or a length. */
static int
put_header(Piece *piece, char kind, Py_ssize_t count)
{
    char text[32];
    char *at = text + sizeof text;
    *--at = '\n';
    *--at = '\r';
    do {
        *--at = (char)('0' + count % 10);
        count /= 10;
    } while (count > 0);
    *--at = kind;
    return put(piece, at, text + sizeof text - at);
}

static int
put_bulk(Piece *piece, const char *text, Py_ssize_t length)
{
    if (put_header(piece, '$', length) < 0 || put(piece, text, length) < 0) {
        return -1;
    }
    return put(piece, "\r\n", 2);
}

/* An int or a float, as repr() writes it. */
static int
put_repr(Piece *piece, PyObject *argument)
{
    if (PyLong_CheckExact(argument)) {
        int overflow = 0;
        long long number = PyLong_AsLongLongAndOverflow(argument, &overflow);
        if (overflow == 0 && !(number == -1 && PyErr_Occurred())) {
            char text[32];
            int length = PyOS_snprintf(text, sizeof text, "%lld", number);
            return put_bulk(piece, text, length);
        }
        PyErr_Clear();
    }
    PyObject *text = PyObject_Repr(argument);
    if (text == NULL) {
        return -1;
    }
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &length);
    int done = utf8 == NULL ? -1 : put_bulk(piece, utf8, length);
    Py_DECREF(text);
    return done;
}

static int
put_argument(Piece *piece, PyObject *argument)
{
    if (PyBytes_Check(argument)) {
        return put_bulk(piece, PyBytes_AS_STRING(argument), PyBytes_GET_SIZE(argument));
    }
    if (PyUnicode_Check(argument)) {
        Py_ssize_t length;
        const char *utf8 = PyUnicode_AsUTF8AndSize(argument, &length);
        return utf8 == NULL ? -1 : put_bulk(piece, utf8, length);
    }
    if (PyLong_CheckExact(argument) || PyFloat_Check(argument)) {
        return put_repr(piece, argument);
    }
    if (PyMemoryView_Check(argument)) {
        Py_buffer view;
        if (PyObject_GetBuffer(argument, &view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        int done = put_bulk(piece, view.buf, view.len);
        PyBuffer_Release(&view);
        return done;
    }
    PyErr_Format(PyExc_TypeError,
                 "a Redis command's argument must be bytes, str, int or float, not %.80s: %.40R",
                 Py_TYPE(argument)->tp_name, argument);
    return -1;
}

/* The piece so far, appended to `pieces` as bytes; the piece starts again empty. */
static int
finish(Piece *piece, PyObject *pieces)
{
    PyObject *done = PyBytes_FromStringAndSize(piece->data, piece->length);
    if (done == NULL) {
        return -1;
    }
    int appended = PyList_Append(pieces, done);
    Py_DECREF(done);
    piece->length = 0;
    return appended;
}

static int
put_command(Piece *piece, PyObject *pieces, PyObject *command, Py_ssize_t large_bytes)
{
    PyObject *arguments = PySequence_Fast(command, "a Redis command must be a sequence");
    if (arguments == NULL) {
        return -1;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(arguments);
    PyObject **items = PySequence_Fast_ITEMS(arguments);
    int failed = put_header(piece, '*', count) < 0;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        PyObject *argument = items[i];
        if (PyBytes_CheckExact(argument) && PyBytes_GET_SIZE(argument) >= large_bytes) {
            failed = put_header(piece, '$', PyBytes_GET_SIZE(argument)) < 0 ||
                     finish(piece, pieces) < 0 || PyList_Append(pieces, argument) < 0 ||
                     put(piece, "\r\n", 2) < 0;
        }
        else {
            failed = put_argument(piece, argument) < 0;
        }
    }
    Py_DECREF(arguments);
    return failed ? -1 : 0;
}

static PyObject *
packed(PyObject *module, PyObject *args)
{
    PyObject *commands;
    Py_ssize_t large_bytes;
    if (!PyArg_ParseTuple(args, "On:packed", &commands, &large_bytes)) {
        return NULL;
    }
    PyObject *iterator = PyObject_GetIter(commands);
    if (iterator == NULL) {
        return NULL;
    }
    PyObject *pieces = PyList_New(0);
    Piece piece = {NULL, 0, 0};
    PyObject *command;
    int failed = pieces == NULL;
    while (!failed && (command = PyIter_Next(iterator)) != NULL) {
        failed = put_command(&piece, pieces, command, large_bytes) < 0;
        Py_DECREF(command);
    }
    failed = failed || PyErr_Occurred() != NULL || (piece.length > 0 && finish(&piece, pieces) < 0);
    PyMem_Free(piece.data);
    Py_DECREF(iterator);
    if (failed) {
        Py_XDECREF(pieces);
        return NULL;
    }
    return pieces;
}

static PyMethodDef methods[] = {
    {"packed", packed, METH_VARARGS,
     "packed(commands, large_bytes) -> [bytes, ...]\n\n"
     "The commands as RESP arrays of bulk strings, in pieces: each bytes argument of\n"
     "large_bytes or more is a piece of its own (the object itself), the rest joined."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_redis_commands",
    "A round of Redis commands encoded in RESP, its large values uncopied.", 0, methods, slots,
};

PyMODINIT_FUNC
PyInit__redis_commands(void)
{
    return PyModuleDef_Init(&module_def);
}
