/*
 * chanstore._cache_hits: the cache's hit path in C (see chanstore/cache_hits.py).
 *
 * The original SDK's CachedDict is a dict: its `in` and `get` are dict's own C
 * methods. A Python method that only looks the key up already costs about twice
 * that, before it counts anything. These three bases put the state a hit reads in
 * C fields and answer a hit without running Python code:
 *
 *   Counts   hits and misses as plain C integers (CacheCounts' base);
 *   Memory   the held values, whether they are the whole domain, and its Counts
 *            (CacheMemory's base);
 *   HitPath  `d[key]`, `d.get(key)` and `key in d` of a held key, or of an absent
 *            key of a complete memory (CachedDict's base).
 *
 * Everything else (a key memory does not hold, a damaged value, a memory of some
 * other type) goes to the subclass's slow path, `_get_slowly` or
 * `_contains_slowly`, exactly as the pure-Python bases in cache_hits.py do.
 * The fields are exposed as members, so Python code reads and writes them as it
 * reads and writes slots. Only the public C API is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The dealloc of Memory and HitPath: untrack, drop the references `clear` drops, free. */
static void
dealloc_cleared(PyObject *self, inquiry clear)
{
    PyObject_GC_UnTrack(self);
    clear(self);
    Py_TYPE(self)->tp_free(self);
}

/* -- Counts ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    unsigned long long hits;
    unsigned long long misses;
} CountsObject;

static PyMemberDef counts_members[] = {
    {"hits", T_ULONGLONG, offsetof(CountsObject, hits), 0,
     "Cache hits counted so far."},
    {"misses", T_ULONGLONG, offsetof(CountsObject, misses), 0,
     "Cache misses counted so far."},
    {NULL},
};

static PyTypeObject CountsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chanstore._cache_hits.Counts",
    .tp_doc = PyDoc_STR("One container's cache hits and misses, as plain numbers."),
    .tp_basicsize = sizeof(CountsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = counts_members,
};

/* -- Memory ------------------------------------------------------------------- */

static PyObject *str_keeps_writes;     /* "keeps_writes" */

typedef struct {
    PyObject_HEAD
    PyObject *values;   /* dict: key -> value, as held */
    PyObject *counts;   /* Counts shared by the container's memories */
    char complete;      /* whether values is the whole domain */
    char keeps_writes;  /* the class's keeps_writes, read when made */
} MemoryObject;

static PyObject *
memory_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    MemoryObject *self = (MemoryObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    /* keeps_writes is a class attribute (False for the null backend's memory):
     * read once here, so that the hit path tests a C field. The name is interned
     * once: the type's attribute cache keeps the name it was asked by, and a new
     * string per memory would be kept there, scattered over the heap. */
    PyObject *keeps = PyObject_GetAttr((PyObject *)type, str_keeps_writes);
    if (keeps == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    int truth = PyObject_IsTrue(keeps);
    Py_DECREF(keeps);
    if (truth < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->keeps_writes = (char)truth;
    return (PyObject *)self;
}

static int
memory_traverse(MemoryObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->values);
    Py_VISIT(self->counts);
    return 0;
}

static int
memory_clear(MemoryObject *self)
{
    Py_CLEAR(self->values);
    Py_CLEAR(self->counts);
    return 0;
}

static void
memory_dealloc(MemoryObject *self)
{
    dealloc_cleared((PyObject *)self, (inquiry)memory_clear);
}

static PyMemberDef memory_members[] = {
    {"_values", T_OBJECT_EX, offsetof(MemoryObject, values), 0,
     "The held values, by key."},
    {"_counts", T_OBJECT_EX, offsetof(MemoryObject, counts), 0,
     "The container's Counts."},
    {"_complete", T_BOOL, offsetof(MemoryObject, complete), 0,
     "Whether the held values are the whole domain."},
    {NULL},
};

static PyTypeObject MemoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chanstore._cache_hits.Memory",
    .tp_doc = PyDoc_STR("The state of a CacheMemory that the hit path reads."),
    .tp_basicsize = sizeof(MemoryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = memory_new,
    .tp_traverse = (traverseproc)memory_traverse,
    .tp_clear = (inquiry)memory_clear,
    .tp_dealloc = (destructor)memory_dealloc,
    .tp_members = memory_members,
};

/* -- HitPath ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *memory;
} HitPathObject;

static PyObject *str_get_slowly;       /* "_get_slowly" */
static PyObject *str_contains_slowly;  /* "_contains_slowly" */

/* The memory whose values a hit may be answered from, or NULL: the caller goes the
 * slow way, which is right for whatever memory holds. */
static inline MemoryObject *
readable_memory(HitPathObject *self)
{
    PyObject *memory = self->memory;
    if (memory == NULL || !PyObject_TypeCheck(memory, &MemoryType)) {
        return NULL;
    }
    MemoryObject *held = (MemoryObject *)memory;
    if (held->values == NULL || !PyDict_CheckExact(held->values) || held->counts == NULL
        || !PyObject_TypeCheck(held->counts, &CountsType)) {
        return NULL;
    }
    return held;
}

static inline void
count_hit(MemoryObject *memory)
{
    ((CountsObject *)memory->counts)->hits++;
}

/* Whether a held value is one the hit path may hand out. A damaged value is held
 * as an UnreadableValue, an exception: the slow path raises a fresh copy. */
static inline int
is_plain_value(PyObject *value)
{
    return !PyExceptionInstance_Check(value);
}

static PyObject *
hit_subscript(HitPathObject *self, PyObject *key)
{
    MemoryObject *memory = readable_memory(self);
    if (memory != NULL) {
        PyObject *value = PyDict_GetItemWithError(memory->values, key);  /* borrowed */
        if (value != NULL && is_plain_value(value)) {
            count_hit(memory);
            Py_INCREF(value);
            return value;
        }
        if (value == NULL && PyErr_Occurred()) {
            return NULL;  /* an unhashable key: as dict says */
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)self, str_get_slowly, key);
}

static int
hit_contains(HitPathObject *self, PyObject *key)
{
    MemoryObject *memory = readable_memory(self);
    if (memory != NULL) {
        int found = PyDict_Contains(memory->values, key);
        if (found < 0) {
            return -1;
        }
        if (found || (memory->complete && memory->keeps_writes)) {
            count_hit(memory);  /* a damaged value is held, and in the mapping too */
            return found;
        }
    }
    PyObject *answer = PyObject_CallMethodOneArg((PyObject *)self, str_contains_slowly, key);
    if (answer == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return truth;
}

/* get(key, default=None), arguments parsed by hand: PyArg_ParseTupleAndKeywords
 * would cost more than the rest of a hit. */
static int
parse_get_arguments(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                    PyObject **key, PyObject **fallback)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    *key = nargs >= 1 ? args[0] : NULL;
    *fallback = nargs >= 2 ? args[1] : NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError,
                     "get() takes from 1 to 2 positional arguments but %zd were given", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot;
        if (PyUnicode_CompareWithASCIIString(name, "key") == 0) {
            slot = key;
        } else if (PyUnicode_CompareWithASCIIString(name, "default") == 0) {
            slot = fallback;
        } else {
            PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%U'", name);
            return -1;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "get() got multiple values for argument '%U'", name);
            return -1;
        }
        *slot = args[nargs + i];
    }
    if (*key == NULL) {
        PyErr_SetString(PyExc_TypeError, "get() missing 1 required positional argument: 'key'");
        return -1;
    }
    if (*fallback == NULL) {
        *fallback = Py_None;
    }
    return 0;
}

static PyObject *
hit_get(HitPathObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *key, *fallback;
    if (parse_get_arguments(args, PyVectorcall_NARGS(nargsf), kwnames, &key, &fallback) < 0) {
        return NULL;
    }
    MemoryObject *memory = readable_memory(self);
    if (memory != NULL) {
        PyObject *value = PyDict_GetItemWithError(memory->values, key);  /* borrowed */
        if (value != NULL && is_plain_value(value)) {
            count_hit(memory);
            Py_INCREF(value);
            return value;
        }
        if (value == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            if (memory->complete && memory->keeps_writes) {
                count_hit(memory);  /* known absent */
                Py_INCREF(fallback);
                return fallback;
            }
        }
    }
    PyObject *value = PyObject_CallMethodOneArg((PyObject *)self, str_get_slowly, key);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
        Py_INCREF(fallback);
        return fallback;
    }
    return value;
}

static int
hit_traverse(HitPathObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->memory);
    return 0;
}

static int
hit_clear(HitPathObject *self)
{
    Py_CLEAR(self->memory);
    return 0;
}

static void
hit_dealloc(HitPathObject *self)
{
    dealloc_cleared((PyObject *)self, (inquiry)hit_clear);
}

static PyMethodDef hit_methods[] = {
    {"get", (PyCFunction)(void (*)(void))hit_get, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("get($self, /, key, default=None)\n--\n\n"
               "``self[key]``, or ``default`` for an absent key.")},
    {NULL},
};

static PyMemberDef hit_members[] = {
    {"memory", T_OBJECT_EX, offsetof(HitPathObject, memory), 0,
     "The CacheMemory the hits are answered from."},
    {NULL},
};

static PyMappingMethods hit_as_mapping = {
    .mp_subscript = (binaryfunc)hit_subscript,
};

static PySequenceMethods hit_as_sequence = {
    .sq_contains = (objobjproc)hit_contains,
};

static PyTypeObject HitPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chanstore._cache_hits.HitPath",
    .tp_doc = PyDoc_STR("CachedDict's reads of what memory holds."),
    .tp_basicsize = sizeof(HitPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)hit_traverse,
    .tp_clear = (inquiry)hit_clear,
    .tp_dealloc = (destructor)hit_dealloc,
    .tp_members = hit_members,
    .tp_methods = hit_methods,
    .tp_as_mapping = &hit_as_mapping,
    .tp_as_sequence = &hit_as_sequence,
};

/* -- the module --------------------------------------------------------------- */

static struct PyModuleDef cache_hits_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chanstore._cache_hits",
    .m_doc = PyDoc_STR("The cache's hit path in C: see chanstore.cache_hits."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__cache_hits(void)
{
    str_get_slowly = PyUnicode_InternFromString("_get_slowly");
    str_contains_slowly = PyUnicode_InternFromString("_contains_slowly");
    str_keeps_writes = PyUnicode_InternFromString("keeps_writes");
    if (str_get_slowly == NULL || str_contains_slowly == NULL || str_keeps_writes == NULL) {
        return NULL;
    }
    if (PyType_Ready(&CountsType) < 0 || PyType_Ready(&MemoryType) < 0
        || PyType_Ready(&HitPathType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&cache_hits_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Counts", (PyObject *)&CountsType) < 0
        || PyModule_AddObjectRef(module, "Memory", (PyObject *)&MemoryType) < 0
        || PyModule_AddObjectRef(module, "HitPath", (PyObject *)&HitPathType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
