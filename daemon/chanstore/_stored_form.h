/* What the files of chanstore._stored_form share: the proof, the re-spelling of a body
 * for it, and the type that runs both beside the event loop. */
#ifndef CHANSTORE_STORED_FORM_H
#define CHANSTORE_STORED_FORM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Whether `data` is the stored form of a JSON document no deeper than `max_depth`
 * (see proves() in _stored_form.c). Needs no GIL; with `without_python` it never
 * takes it either, and declines the rare floats only CPython's dtoa can decide.
 * Sets *out_of_memory when it ran out (and then answers 0). */
int stored_form_proven(const unsigned char *data, Py_ssize_t length, int max_depth,
                       int without_python, int *out_of_memory);

/* Texts of at least this many bytes are read without the GIL (hashlib's threshold is
 * 2 KiB; below a few KiB the release costs more than it frees). */
#define STORED_FORM_WITHOUT_GIL_BYTES 4096

/* The first byte from `at` that a string cannot hold as it is (a quote, a backslash, a
 * control byte, DEL or a non-ASCII byte), or `end`. Here, so that each file inlines it. */
static inline const unsigned char *
stored_form_string_stop(const unsigned char *at, const unsigned char *end)
{
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    const __m128i backslash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(' ');
    const __m128i del = _mm_set1_epi8(0x7f);
    while (end - at >= 16) {
        __m128i chunk = _mm_loadu_si128((const __m128i *)at);
        /* As signed bytes, controls and non-ASCII bytes are both below ' '. */
        __m128i stop = _mm_or_si128(
            _mm_or_si128(_mm_cmpeq_epi8(chunk, quote), _mm_cmpeq_epi8(chunk, backslash)),
            _mm_or_si128(_mm_cmplt_epi8(chunk, space), _mm_cmpeq_epi8(chunk, del)));
        int mask = _mm_movemask_epi8(stop);
        if (mask != 0) {
            return at + __builtin_ctz((unsigned int)mask);
        }
        at += 16;
    }
#endif
    while (at < end) {
        unsigned char byte = *at;
        if (byte == '"' || byte == '\\' || byte < 0x20 || byte >= 0x7f) {
            return at;
        }
        at++;
    }
    return end;
}

/* Text being written: into a room the caller made (`own` 0) until it needs more, then
 * in a buffer of its own made with PyMem_RawMalloc (`own` 1), which a writer may also
 * start with. */
typedef struct {
    char *bytes;
    Py_ssize_t length;
    Py_ssize_t capacity;
    int own;
} Output;

/* Room for `more` bytes past the room there is: rare, and out of line so that the small
 * functions below stay inlined where they are called (made calls, they took a third of
 * indenting's time). 0 when out of memory. */
int stored_form_grow(Output *out, Py_ssize_t more);

static Py_ALWAYS_INLINE inline int
stored_form_reserve(Output *out, Py_ssize_t more)
{
    return out->length + more <= out->capacity || stored_form_grow(out, more);
}

/* Write `length` bytes; 0 when out of memory. */
static Py_ALWAYS_INLINE inline int
stored_form_put(Output *out, const void *bytes, Py_ssize_t length)
{
    if (!stored_form_reserve(out, length)) {
        return 0;
    }
    memcpy(out->bytes + out->length, bytes, (size_t)length);
    out->length += length;
    return 1;
}

/* `data` re-spelt as its stored form would be (see _stored_form_compact.c), in a buffer
 * made with PyMem_RawMalloc and given back in *compacted; answers its length. 0 (and
 * *compacted NULL) where that needs a parser or changes nothing; -1 when out of memory.
 * Needs no GIL. */
Py_ssize_t stored_form_compact(const unsigned char *data, Py_ssize_t length,
                               char **compacted);

/* The stored form of `data` had without parsing it (stored_text(), and Beside's threads):
 * 1 when `data` itself is proven (*respelt NULL), or its re-spelling is (in *respelt,
 * made with PyMem_RawMalloc, *respelt_length bytes); 0 when neither is, or when out of
 * memory (*out_of_memory set). Needs no GIL; `without_python` as for the proof. */
int stored_form_text(const unsigned char *data, Py_ssize_t length, int max_depth,
                     int without_python, int *out_of_memory, char **respelt,
                     Py_ssize_t *respelt_length);

/* compacted(data) and stored_text(data, max_depth), the module's functions. */
PyObject *stored_form_compacted(PyObject *module, PyObject *arg);
PyObject *stored_form_stored_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

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
