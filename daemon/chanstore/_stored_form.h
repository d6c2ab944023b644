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

/* Room for the indented form of a stored form of `length` bytes, which chat state fits. */
#define STORED_FORM_INDENT_ROOM(length) ((length) + (length) / 4 + 64)

/* Re-space the stored form `data` with an indent of 2, into `room` (`capacity` bytes)
 * where it fits, else into a buffer of its own made with PyMem_RawMalloc, given back in
 * *own (NULL when the room sufficed). Answers the length written; -1 when out of memory
 * (and *own is NULL). Needs no GIL: `room` must be held by the caller alone. */
Py_ssize_t stored_form_indent(const unsigned char *data, Py_ssize_t length, char *room,
                              Py_ssize_t capacity, char **own);

/* indented()'s answer, with the GIL: `room`, the bytes object the form was written into
 * (its reference is taken), shrunk to `length`; or `own`'s bytes (then freed); or a
 * MemoryError for a length of -1. */
PyObject *stored_form_indented_answer(PyObject *room, Py_ssize_t length, char *own);

/* A max_depth argument, checked: from 0 to 1000; -1 with an exception set otherwise. */
int stored_form_max_depth(PyObject *number);

/* Add the Beside type to the module (_stored_form_beside.c); -1 with an exception set. */
int stored_form_add_beside(PyObject *module);

#endif
