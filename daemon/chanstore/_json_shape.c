/*
 * chanstore._json_shape: whether a Python value is already its own JSON shape
 * (see chanstore/json_shape.py).
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
 * the value cannot change while it is read. Only the public C API is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>

/* Containers nested deeper are not proven: orjson, which encodes a plain value,
 * refuses more than 255 levels itself, and the bound keeps the C stack small. */
#define MAX_DEPTH 255

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

static PyMethodDef json_shape_methods[] = {
    {"plain", (PyCFunction)(void (*)(void))json_shape_plain, METH_FASTCALL,
     PyDoc_STR("plain(value, type_key, value_key) -> bool: whether value is its own JSON "
               "shape (False: not proven; walk it).")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef json_shape_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chanstore._json_shape",
    .m_doc = PyDoc_STR("Whether a value is its own JSON shape, in C: see chanstore.json_shape."),
    .m_size = -1,
    .m_methods = json_shape_methods,
};

PyMODINIT_FUNC
PyInit__json_shape(void)
{
    return PyModule_Create(&json_shape_module);
}
