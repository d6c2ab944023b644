/* A body re-spelt as its stored form would be, without parsing it.
 *
 *   compacted(data) -> bytes or None
 *       data without the whitespace between its tokens, and with every
 *       string escaped as json.dumps escapes it; None where that cannot be
 *       done without a parser (see below), or where data is spelt so already.
 *
 *   stored_text(data, max_depth) -> bytes or None
 *       the stored form of data's document had without parsing it: data
 *       itself when proves() says so, else its compacted() form when that
 *       is proven; None when neither is. Beside's threads do the same.
 *
 * Clients other than chanstore's send a value in other spellings: Python's
 * json.dumps puts a space after every ',' and ':', JavaScript's
 * JSON.stringify writes non-ASCII characters as they are, pretty printers
 * indent. The proof (_stored_form.c) declines each of them, and the daemon
 * parsed such a body into Python objects only to write it again: a PUT of
 * 100 KB served a third as many as of a compact body, a fifteenth with text
 * that is not all ASCII. Yet the stored form of such a body
 * is the same tokens spelt otherwise: with no whitespace between them, and
 * each string escaped as the stdlib escapes it (ASCII only, \uXXXX in lower
 * case, a surrogate pair beyond the BMP, the short escapes \" \\ \b \f \n
 * \r \t). compacted() writes that spelling in one pass; the proof of what it
 * wrote then decides, as for any body (numbers as repr writes them, the keys
 * of an object distinct once unescaped, nesting within bounds). What it
 * proves is the stored form of the body's document: whitespace between
 * tokens means nothing in JSON, and a string unescaped and escaped again is
 * the same string.
 *
 * It declines (NULL, and the caller parses as before, which also words what
 * is wrong with a bad body) where only a parser may judge: a string that is
 * not valid UTF-8 (overlong forms and encoded surrogates included), holds a
 * raw control character, an unknown escape or a lone surrogate, or does not
 * end; and where taking whitespace out would join two tokens into one
 * ("1 2" into 12, "- 1" into -1: invalid JSON made valid).
 *
 * Needs no GIL: it reads `data` and writes a buffer of its own.
 */

#include "_stored_form.h"

#include <string.h>

enum { DECLINED = 0, WRITTEN = 1, OUT_OF_MEMORY = -1 };

/* A \uXXXX escape of a code unit, in lower case as the stdlib writes it. */
static int
put_unit(Output *out, unsigned long unit)
{
    static const char hex[] = "0123456789abcdef";
    char escape[6] = {'\\', 'u', hex[(unit >> 12) & 15], hex[(unit >> 8) & 15],
                      hex[(unit >> 4) & 15], hex[unit & 15]};
    return stored_form_put(out, escape, sizeof escape);
}

/* A character of a string, as json.dumps writes it (ensure_ascii, its default). */
static int
put_character(Output *out, unsigned long point)
{
    char escape[2] = {'\\', 0};
    switch (point) {
    case '"': escape[1] = '"'; break;
    case '\\': escape[1] = '\\'; break;
    case '\b': escape[1] = 'b'; break;
    case '\f': escape[1] = 'f'; break;
    case '\n': escape[1] = 'n'; break;
    case '\r': escape[1] = 'r'; break;
    case '\t': escape[1] = 't'; break;
    }
    if (escape[1] != 0) {
        return stored_form_put(out, escape, 2);
    }
    if (point >= 0x20 && point < 0x7f) {
        char byte = (char)point;
        return stored_form_put(out, &byte, 1);
    }
    if (point < 0x10000) {
        return put_unit(out, point);
    }
    point -= 0x10000;
    return put_unit(out, 0xd800 | (point >> 10)) && put_unit(out, 0xdc00 | (point & 0x3ff));
}

/* The code unit of a \uXXXX at `at` (which points at the 'u'), hex digits in either case;
 * -1 when it is not one. */
static long
unit_at(const unsigned char *at, const unsigned char *end)
{
    if (end - at < 5 || at[0] != 'u') {
        return -1;
    }
    long unit = 0;
    for (int i = 1; i <= 4; i++) {
        unsigned char byte = at[i];
        int digit = byte >= '0' && byte <= '9'   ? byte - '0'
                    : byte >= 'a' && byte <= 'f' ? byte - 'a' + 10
                    : byte >= 'A' && byte <= 'F' ? byte - 'A' + 10
                                                 : -1;
        if (digit < 0) {
            return -1;
        }
        unit = unit * 16 + digit;
    }
    return unit;
}

/* The character an escape at *at (its backslash) stands for, and *at past it; -1 for an
 * unknown escape or a lone surrogate (a high one not followed by the escape of a low). */
static long
escaped(const unsigned char **at, const unsigned char *end)
{
    const unsigned char *escape = *at;
    if (end - escape < 2) {
        return -1;
    }
    long point;
    switch (escape[1]) {
    case '"': point = '"'; break;
    case '\\': point = '\\'; break;
    case '/': point = '/'; break;
    case 'b': point = '\b'; break;
    case 'f': point = '\f'; break;
    case 'n': point = '\n'; break;
    case 'r': point = '\r'; break;
    case 't': point = '\t'; break;
    case 'u': {
        point = unit_at(escape + 1, end);
        if (point < 0xd800 || point > 0xdfff) {
            *at = escape + 6;
            return point; /* -1 for a malformed one */
        }
        long low = (point <= 0xdbff && end - escape >= 12 && escape[6] == '\\')
                       ? unit_at(escape + 7, end)
                       : -1;
        if (low < 0xdc00 || low > 0xdfff) {
            return -1;
        }
        *at = escape + 12;
        return 0x10000 + ((point - 0xd800) << 10) + (low - 0xdc00);
    }
    default:
        return -1;
    }
    *at = escape + 2;
    return point;
}

/* The character whose UTF-8 starts at *at, and *at past it; -1 where the bytes are not
 * UTF-8 as Python's strict decoder reads it (no overlong forms, no surrogates). */
static long
decoded(const unsigned char **at, const unsigned char *end)
{
    const unsigned char *start = *at;
    unsigned char lead = start[0], low = 0x80, high = 0xbf;
    int more;
    long point;
    if (lead >= 0xc2 && lead <= 0xdf) {
        more = 1;
        point = lead & 0x1f;
    }
    else if (lead >= 0xe0 && lead <= 0xef) {
        more = 2;
        point = lead & 0x0f;
        low = lead == 0xe0 ? 0xa0 : low;   /* overlong below */
        high = lead == 0xed ? 0x9f : high; /* surrogates above */
    }
    else if (lead >= 0xf0 && lead <= 0xf4) {
        more = 3;
        point = lead & 0x07;
        low = lead == 0xf0 ? 0x90 : low;   /* overlong below */
        high = lead == 0xf4 ? 0x8f : high; /* beyond U+10FFFF above */
    }
    else {
        return -1;
    }
    if (end - start <= more) {
        return -1;
    }
    for (int i = 1; i <= more; i++) {
        unsigned char byte = start[i];
        if (byte < (i == 1 ? low : 0x80) || byte > (i == 1 ? high : 0xbf)) {
            return -1;
        }
        point = (point << 6) | (byte & 0x3f);
    }
    *at = start + 1 + more;
    return point;
}

/* The string whose opening quote is at *at, escaped as the stdlib escapes it, and *at
 * past its closing quote. */
static int
string(Output *out, const unsigned char **at, const unsigned char *end)
{
    const unsigned char *from = *at + 1;
    if (!stored_form_put(out, "\"", 1)) {
        return OUT_OF_MEMORY;
    }
    for (;;) {
        const unsigned char *stop = stored_form_string_stop(from, end);
        if (!stored_form_put(out, from, stop - from)) {
            return OUT_OF_MEMORY;
        }
        if (stop == end) {
            return DECLINED; /* it does not end */
        }
        if (*stop == '"') {
            *at = stop + 1;
            return stored_form_put(out, "\"", 1) ? WRITTEN : OUT_OF_MEMORY;
        }
        from = stop;
        long point;
        if (*stop == '\\') {
            point = escaped(&from, end);
        }
        else if (*stop >= 0x80) {
            point = decoded(&from, end);
        }
        else if (*stop == 0x7f) {
            point = 0x7f; /* DEL, which the stdlib escapes */
            from++;
        }
        else {
            return DECLINED; /* a raw control character: invalid JSON */
        }
        if (point < 0) {
            return DECLINED;
        }
        if (!put_character(out, point)) {
            return OUT_OF_MEMORY;
        }
    }
}

static int
is_space(unsigned char byte)
{
    return byte == ' ' || byte == '\t' || byte == '\n' || byte == '\r';
}

/* Whether a byte can be part of a number or a literal: two such bytes with whitespace
 * between them are two tokens, which must not become one. */
static int
in_word(unsigned char byte)
{
    switch (byte) {
    case 0: case '{': case '}': case '[': case ']': case ',': case ':': case '"':
        return 0;
    }
    return !is_space(byte);
}

static int
compact(Output *out, const unsigned char *at, const unsigned char *end)
{
    unsigned char last = 0; /* the last byte written outside a string; 0 at first */
    int spaced = 0;         /* whether whitespace was left out since */
    while (at < end) {
        unsigned char byte = *at;
        if (is_space(byte)) {
            spaced = 1;
            at++;
            continue;
        }
        if (spaced && in_word(last) && in_word(byte)) {
            return DECLINED;
        }
        spaced = 0;
        if (byte == '"') {
            int outcome = string(out, &at, end);
            if (outcome != WRITTEN) {
                return outcome;
            }
            last = '"';
            continue;
        }
        const unsigned char *word = at;
        while (at < end && !is_space(*at) && *at != '"') {
            at++;
        }
        if (!stored_form_put(out, word, at - word)) {
            return OUT_OF_MEMORY;
        }
        last = at[-1];
    }
    return WRITTEN;
}

Py_ssize_t
stored_form_compact(const unsigned char *data, Py_ssize_t length, char **compacted)
{
    /* Room for the body: what a body spaced or escaped otherwise (the usual case) needs. */
    Output out = {.bytes = PyMem_RawMalloc((size_t)length + 64), .capacity = length + 64,
                  .own = 1};
    *compacted = NULL;
    if (out.bytes == NULL) {
        return -1;
    }
    int outcome = compact(&out, data, data + length);
    if (outcome != WRITTEN || out.length == 0 ||
        (out.length == length && memcmp(out.bytes, data, (size_t)length) == 0)) {
        PyMem_RawFree(out.bytes);
        return outcome == OUT_OF_MEMORY ? -1 : 0;
    }
    *compacted = out.bytes;
    return out.length;
}

int
stored_form_text(const unsigned char *data, Py_ssize_t length, int max_depth,
                 int without_python, int *out_of_memory, char **respelt,
                 Py_ssize_t *respelt_length)
{
    *respelt = NULL;
    *respelt_length = 0;
    if (stored_form_proven(data, length, max_depth, without_python, out_of_memory)) {
        return 1;
    }
    if (*out_of_memory) {
        return 0;
    }
    char *compacted;
    Py_ssize_t written = stored_form_compact(data, length, &compacted);
    if (written <= 0) {
        *out_of_memory = written < 0;
        return 0;
    }
    if (!stored_form_proven((const unsigned char *)compacted, written, max_depth,
                            without_python, out_of_memory)) {
        PyMem_RawFree(compacted);
        return 0;
    }
    *respelt = compacted;
    *respelt_length = written;
    return 1;
}

PyObject *
stored_form_stored_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stored_text() takes data and max_depth");
        return NULL;
    }
    int max_depth = stored_form_max_depth(args[1]);
    if (max_depth < 0) {
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    int proven, out_of_memory;
    char *respelt;
    Py_ssize_t length;
    if (data.len >= STORED_FORM_WITHOUT_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        proven = stored_form_text(data.buf, data.len, max_depth, 0, &out_of_memory, &respelt,
                                  &length);
        Py_END_ALLOW_THREADS
    }
    else {
        proven = stored_form_text(data.buf, data.len, max_depth, 0, &out_of_memory, &respelt,
                                  &length);
    }
    PyBuffer_Release(&data);
    if (out_of_memory) {
        return PyErr_NoMemory();
    }
    if (!proven) {
        Py_RETURN_NONE;
    }
    if (respelt == NULL) {
        return Py_NewRef(args[0]);
    }
    PyObject *answer = PyBytes_FromStringAndSize(respelt, length);
    PyMem_RawFree(respelt);
    return answer;
}

PyObject *
stored_form_compacted(PyObject *module, PyObject *arg)
{
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    char *compacted;
    Py_ssize_t length;
    if (data.len >= STORED_FORM_WITHOUT_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        length = stored_form_compact(data.buf, data.len, &compacted);
        Py_END_ALLOW_THREADS
    }
    else {
        length = stored_form_compact(data.buf, data.len, &compacted);
    }
    PyBuffer_Release(&data);
    if (length < 0) {
        return PyErr_NoMemory();
    }
    if (compacted == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *answer = PyBytes_FromStringAndSize(compacted, length);
    PyMem_RawFree(compacted);
    return answer;
}
