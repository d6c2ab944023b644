/*
 * chanstore._json_shape: what a Python value or a JSON text holds that the codec
 * must handle itself (see chanstore/json_shape.py).
 *
 * Before a value is encoded, codec.to_json_shape copies it with every part
 * JSON cannot hold replaced by its type mark. Most values hold no such part:
 * dicts with str keys, lists, str, int, bool, None and finite floats, of
 * exactly those types. Their shape is the value itself, and building the copy
 * in Python was most of an encode: 450 us of 570 for 100 KB of chat messages,
 * 1.6 ms of 1.8 for 100 KB of game state.
 *
 *   plain(value, type_key, value_key) -> bool
 *       True when `value` is its own shape: every part one of the exact
 *       types above, every float finite, every dict key an exact str, and no
 *       dict of two keys that are type_key and value_key (a plain dict shaped
 *       like a mark is written as its items). False is not an error: it says
 *       "not proven", and the caller walks the value in Python, which also
 *       words what cannot be stored. So the check may refuse what it does not
 *       want to reason about: nesting deeper than MAX_DEPTH (a value that
 *       contains itself among them).
 *
 * The walk runs no Python code (no __eq__, __hash__ or __len__ of a foreign
 * type: only exact types are looked into, and keys are compared as str), so
 * the value cannot change while it is read.
 *
 * Before a text is parsed by orjson, the codec looks for what orjson would
 * read otherwise than the stdlib, and for type marks to revive. Python's
 * bytes.translate and `in` took 150 us of a 300 us decode of 100 KB:
 *
 *   long_integer(data) -> bool
 *       Whether data may hold an integer of LONG_INTEGER_DIGITS digits or
 *       more (orjson reads one beyond 64 bits as a float): that many digits
 *       in a row, not after a digit, '.', 'e' or 'E' (a fraction or an
 *       exponent), wherever they are, strings included.
 *   may_name(data, name) -> bool
 *       Whether data holds `name`, or a \u00 escape that may spell part of it.
 *
 * Only the public C API is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Containers nested deeper are not proven: orjson, which encodes a plain value,
 * refuses 255 levels or more itself, and the bound keeps the C stack small. */
#define MAX_DEPTH 254

/* An integer of this many digits may be beyond 64 bits (2^63 has 19). */
#define LONG_INTEGER_DIGITS 19

typedef struct {
    PyObject *type_key;
    PyObject *value_key;
} Marks;

static int plain(PyObject *value, const Marks *marks, int depth);

static int
is_mark_key(PyObject *key, const Marks *marks)
{
    return PyUnicode_Compare(key, marks->type_key) == 0
           || PyUnicode_Compare(key, marks->value_key) == 0;
}

static int
plain_dict(PyObject *dict, const Marks *marks, int depth)
{
    Py_ssize_t position = 0;
    PyObject *key, *item;
    /* Only a dict of two keys can be shaped like a mark: the others' keys are not compared. */
    int two = PyDict_GET_SIZE(dict) == 2, mark_keys = 0;
    while (PyDict_Next(dict, &position, &key, &item)) {
        if (!PyUnicode_CheckExact(key) || !plain(item, marks, depth)) {
            return 0;
        }
        mark_keys += two && is_mark_key(key, marks);
    }
    return mark_keys < 2; /* two distinct mark keys: the mark's two halves */
}

static int
plain_list(PyObject *list, const Marks *marks, int depth)
{
    for (Py_ssize_t index = 0; index < PyList_GET_SIZE(list); index++) {
        if (!plain(PyList_GET_ITEM(list, index), marks, depth)) {
            return 0;
        }
    }
    return 1;
}

static int
plain(PyObject *value, const Marks *marks, int depth)
{
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyUnicode_Type || type == &PyLong_Type || type == &PyBool_Type
        || value == Py_None) {
        return 1;
    }
    if (type == &PyFloat_Type) {
        return isfinite(PyFloat_AS_DOUBLE(value));
    }
    if (type != &PyDict_Type && type != &PyList_Type) {
        return 0;
    }
    if (depth >= MAX_DEPTH) {
        return 0;
    }
    return type == &PyDict_Type ? plain_dict(value, marks, depth + 1)
                                : plain_list(value, marks, depth + 1);
}

static PyObject *
json_shape_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain() takes value, type_key and value_key");
        return NULL;
    }
    if (!PyUnicode_CheckExact(args[1]) || !PyUnicode_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "plain(): type_key and value_key must be str");
        return NULL;
    }
    Marks marks = {.type_key = args[1], .value_key = args[2]};
    return PyBool_FromLong(plain(args[0], &marks, 0));
}

/* -- texts ---------------------------------------------------------------------- */

static int
is_digit(unsigned char byte)
{
    return (unsigned char)(byte - '0') < 10;
}

static int
continues_number(unsigned char byte)
{
    return byte == '.' || byte == 'e' || byte == 'E';
}

/* Whether a run of digits from `from` on (the start of a run, or of the text) reaches
 * LONG_INTEGER_DIGITS where a run may count, byte by byte. */
static int
long_run_from(const unsigned char *start, const unsigned char *from, const unsigned char *end)
{
    Py_ssize_t run = 0;
    int counts = from == start || !continues_number(from[-1]);
    for (const unsigned char *at = from; at < end; at++) {
        if (is_digit(*at)) {
            if (++run >= LONG_INTEGER_DIGITS && counts) {
                return 1;
            }
        }
        else {
            run = 0;
            counts = !continues_number(*at);
        }
    }
    return 0;
}

/* The first byte of the run of digits that `inside` is in (or follows). */
static const unsigned char *
run_start(const unsigned char *start, const unsigned char *inside)
{
    while (inside > start && is_digit(inside[-1])) {
        inside--;
    }
    return inside;
}

static int
holds_long_integer(const unsigned char *start, const unsigned char *end)
{
    const unsigned char *at = start;
#if defined(__SSE2__)
    /* A run of 15 digits or more fills one of the 8-byte halves of the 16-byte chunks
     * read from `at` on, wherever it lies: only a run that fills a half is measured
     * (once: reading goes on after it), and most of a text is read 16 bytes at a time. */
    while (end - at >= 16) {
        __m128i chunk = _mm_loadu_si128((const __m128i *)at);
        __m128i offset = _mm_sub_epi8(chunk, _mm_set1_epi8('0'));
        int digits = _mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_min_epu8(offset, _mm_set1_epi8(9)), offset));
        const unsigned char *full = (digits & 0xff) == 0xff     ? at
                                    : (digits >> 8) == 0xff ? at + 8
                                                            : NULL;
        if (full == NULL) {
            at += 16;
            continue;
        }
        const unsigned char *first = run_start(start, full), *last = full;
        while (last < end && is_digit(*last)) {
            last++;
        }
        if (last - first >= LONG_INTEGER_DIGITS
            && (first == start || !continues_number(first[-1]))) {
            return 1;
        }
        at = last; /* a byte that is no digit, or the end */
    }
    /* The last bytes, with the run that reaches into them from before. */
    at = run_start(start, at);
#endif
    return long_run_from(start, at, end);
}

/* Whether data holds needle: looked for at each of its first byte, which in JSON is
 * rarer than most ('_', '\\'), by memchr. */
static int
holds(const unsigned char *data, size_t length, const unsigned char *needle, size_t size)
{
    const unsigned char *at = data, *end = data + length;
    if (size == 0) {
        return 1; /* as Python's `in` answers */
    }
    while ((size_t)(end - at) >= size) {
        at = memchr(at, needle[0], (size_t)(end - at) - size + 1);
        if (at == NULL) {
            return 0;
        }
        if (memcmp(at, needle, size) == 0) {
            return 1;
        }
        at++;
    }
    return 0;
}

static PyObject *
json_shape_long_integer(PyObject *module, PyObject *argument)
{
    Py_buffer view;
    if (PyObject_GetBuffer(argument, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    int found = holds_long_integer(data, data + view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyObject *
json_shape_may_name(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "may_name() takes data and name");
        return NULL;
    }
    Py_buffer view, name;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &name, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    size_t length = (size_t)view.len;
    int found = holds(view.buf, length, name.buf, (size_t)name.len)
                || holds(view.buf, length, (const unsigned char *)"\\u00", 4);
    PyBuffer_Release(&name);
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef json_shape_methods[] = {
    {"plain", (PyCFunction)(void (*)(void))json_shape_plain, METH_FASTCALL,
     PyDoc_STR("plain(value, type_key, value_key) -> bool: whether value is its own JSON "
               "shape (False: not proven; walk it).")},
    {"long_integer", json_shape_long_integer, METH_O,
     PyDoc_STR("long_integer(data) -> bool: whether data may hold an integer of 19 digits "
               "or more.")},
    {"may_name", (PyCFunction)(void (*)(void))json_shape_may_name, METH_FASTCALL,
     PyDoc_STR("may_name(data, name) -> bool: whether data holds name, or a \\u00 escape.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef json_shape_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chanstore._json_shape",
    .m_doc = PyDoc_STR("What a value or a JSON text holds, in C: see chanstore.json_shape."),
    .m_size = -1,
    .m_methods = json_shape_methods,
};

PyMODINIT_FUNC
PyInit__json_shape(void)
{
    return PyModule_Create(&json_shape_module);
}
