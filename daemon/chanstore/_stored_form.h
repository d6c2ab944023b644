/* What the two files of chanstore._stored_form share: the proof, and the type that
 * runs it beside the event loop. */
#ifndef CHANSTORE_STORED_FORM_H
#define CHANSTORE_STORED_FORM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Whether `data` is the stored form of a JSON document no deeper than `max_depth`
 * (see proves() in _stored_form.c). Needs no GIL; with `without_python` it never
 * takes it either, and declines the rare floats only CPython's dtoa can decide.
 * Sets *out_of_memory when it ran out (and then answers 0). */
int stored_form_proven(const unsigned char *data, Py_ssize_t length, int max_depth,
                       int without_python, int *out_of_memory);

/* A max_depth argument, checked: from 0 to 1000; -1 with an exception set otherwise. */
int stored_form_max_depth(PyObject *number);

/* Add the Beside type to the module (_stored_form_beside.c); -1 with an exception set. */
int stored_form_add_beside(PyObject *module);

#endif
