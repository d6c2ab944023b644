/* The stored form of a JSON document, proven and indented without building it.
 *
 * chanstore stores a value as the compact text the standard library's
 * json.dumps writes (ASCII, \uXXXX escapes, repr floats). A large body that
 * is already that text (what chanstore's clients send) can be stored as it
 * came, if that can be proven: parsing it into Python objects only to write
 * the same bytes again costs more than anything else a large PUT does.
 *
 *   proves(data, max_depth) -> bool
 *       True when data is exactly json.dumps(json.loads(data),
 *       separators=(",", ":")) and nests no deeper than max_depth
 *       containers. False is not an error: it says "not proven", and the
 *       caller parses as before (every invalid body is False). So the check
 *       may refuse what it does not want to reason about: lone surrogates,
 *       integers of more than 18 digits.
 *
 *   indented(data) -> bytes
 *       The stored form data re-written as json.dumps(..., indent=2) writes
 *       it (the json backend's file form). data must be a stored form; any
 *       other bytes are re-spaced without a crash, but not meaningfully.
 *
 * Both let other threads run while they read a large text (as hashlib does),
 * so that the daemon's event loop goes on while a worker thread proves a
 * body or re-spaces a file. chanstore hands them bytes, which cannot change
 * meanwhile; a bytearray changed meanwhile could get a wrong answer, never a
 * read past its end (its length cannot change while it is read).
 *
 * _stored_form_compact.c re-spells a body that is not its stored form as that
 * form would be (compacted()), for the proof to decide again, and
 * _stored_form_beside.c runs both on threads that never take the GIL (the type
 * Beside). See chanstore/stored_form.py, which wraps them all.
 */

#include "_stored_form.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Objects of up to this many keys are checked for a repeated key pair by
 * pair; larger ones are sorted. */
#define FEW_KEYS 16
/* Integers of more digits are left to the parser (the stdlib reads them
 * beyond 64 bits, and refuses more than 4,300 digits). */
#define MOST_INT_DIGITS 18

typedef struct {
    const char *start;
    Py_ssize_t length;
} Span;

typedef struct {
    const unsigned char *at;
    const unsigned char *end;
    int depth;
    int max_depth;
    Span *keys; /* the keys of every object being checked, innermost last */
    Py_ssize_t key_count;
    Py_ssize_t key_capacity;
    int out_of_memory;
    int without_python; /* on a thread that never takes the GIL (see _stored_form_beside.c) */
} Check;

static int value(Check *check);

static int
hex_digit(unsigned char byte)
{
    if (byte >= '0' && byte <= '9') {
        return byte - '0';
    }
    if (byte >= 'a' && byte <= 'f') {
        return byte - 'a' + 10;
    }
    return -1; /* upper case hex is not what the stdlib writes */
}

/* The code unit of a lower-case \uXXXX at `at` (which points at the 'u'), or -1. */
static long
code_unit(const unsigned char *at, const unsigned char *end)
{
    long unit = 0;
    if (end - at < 5 || at[0] != 'u') {
        return -1;
    }
    for (int i = 1; i <= 4; i++) {
        int digit = hex_digit(at[i]);
        if (digit < 0) {
            return -1;
        }
        unit = unit * 16 + digit;
    }
    return unit;
}

/* An escape the stdlib writes with \u: the other controls, DEL, non-ASCII. */
static int
written_as_unit(long unit)
{
    switch (unit) {
    case '\b': case '\t': case '\n': case '\f': case '\r':
        return 0;
    }
    return unit < 0x20 || unit >= 0x7f;
}

/* A string from its opening quote, every escape as the stdlib writes it. */
static int
string(Check *check)
{
    const unsigned char *at = check->at + 1;
    const unsigned char *end = check->end;
    for (;;) {
        at = stored_form_string_stop(at, end);
        if (at == end) {
            return 0;
        }
        if (*at == '"') {
            check->at = at + 1;
            return 1;
        }
        if (*at != '\\' || end - at < 2) {
            return 0; /* a raw control, DEL or non-ASCII byte */
        }
        switch (at[1]) {
        case '"': case '\\': case 'b': case 'f': case 'n': case 'r': case 't':
            at += 2;
            continue;
        case 'u':
            break;
        default:
            return 0; /* \/ included: the stdlib writes '/' */
        }
        long unit = code_unit(at + 1, end);
        if (unit < 0 || !written_as_unit(unit)) {
            return 0;
        }
        if (unit >= 0xd800 && unit <= 0xdfff) {
            /* Only a high surrogate followed by a low one, which the stdlib
             * writes back as the same pair; a lone one is left to the parser. */
            long low = (end - at >= 12 && at[6] == '\\') ? code_unit(at + 7, end) : -1;
            if (unit > 0xdbff || low < 0xdc00 || low > 0xdfff) {
                return 0;
            }
            at += 6;
        }
        at += 6;
    }
}

static int
is_digit(const unsigned char *at, const unsigned char *end)
{
    return at < end && *at >= '0' && *at <= '9';
}

/* -- floats ---------------------------------------------------------------
 *
 * A float is stored as repr() writes it: the fewest significant digits that
 * read back as the same double (the closest such digits where several do),
 * in repr's layout. Writing each float back with CPython's dtoa costs about
 * 0.75 us for the 17 digits of a timestamp, more than the rest of the check
 * of a chat message; so the check reasons about the digits instead:
 *
 * - the token must be laid out as repr lays out its own digits;
 * - up to 15 significant digits (a normal double), those digits are the only
 *   ones of that length that read back as the double, so they are repr's;
 * - with 16 or 17, no decimal of one digit fewer may read back as the same
 *   double (it suffices to try the two around the token), and the token must
 *   be the closest of its length: exact integer arithmetic in 128 bits.
 *
 * What does not fit those bounds is written back by CPython, as before. */

/* Significant digits a float token may have and still be reasoned about (2^64 > 10^19). */
#define MOST_DIGITS 19

typedef struct {
    int negative;
    uint64_t digits; /* significant, without leading or trailing zeros */
    int count;       /* how many */
    int exponent;    /* the power of ten of the last one */
    /* Those digits as the token writes them, then '0's: laying them out again takes no
     * division, and any 20 bytes from one of the digits can be copied at once. */
    char text[40]; /* MOST_DIGITS + 20, rounded up to whole 8-byte words */
} Decimal;

/* Fill a Decimal's text with '0's, a word at a time. GCC compiles a memset (or memcpy)
 * of this size to `rep stosb` (`rep movsb`), whose start-up cost was a tenth of the
 * check's own time in a body of chat messages, a timestamp each. */
static void
zero_text(Decimal *decimal)
{
    const uint64_t zeros = 0x3030303030303030u;
    for (size_t word = 0; word < sizeof decimal->text / 8; word++) {
        memcpy(decimal->text + 8 * word, &zeros, 8);
    }
}

/* The decimal a JSON number token holds; 0 if it has more than MOST_DIGITS digits. */
static int
decimal_of(const unsigned char *at, const unsigned char *end, Decimal *decimal)
{
    int seen = 0, fraction = 0, after_point = 0, exponent = 0, exponent_sign = 1;
    decimal->negative = at < end && *at == '-';
    decimal->digits = 0;
    zero_text(decimal);
    at += decimal->negative;
    for (; at < end && *at != 'e' && *at != 'E'; at++) {
        if (*at == '.') {
            after_point = 1;
            continue;
        }
        fraction += after_point;
        if (seen == 0 && *at == '0') {
            continue; /* a leading zero */
        }
        if (seen == MOST_DIGITS) {
            return 0;
        }
        decimal->text[seen++] = (char)*at;
        decimal->digits = decimal->digits * 10 + (uint64_t)(*at - '0');
    }
    if (at < end) {
        at++;
        if (*at == '+' || *at == '-') {
            exponent_sign = *at++ == '-' ? -1 : 1;
        }
        for (; at < end; at++) {
            if (exponent > 100000) {
                return 0;
            }
            exponent = exponent * 10 + (*at - '0');
        }
    }
    decimal->exponent = exponent_sign * exponent - fraction;
    for (; seen > 0 && decimal->text[seen - 1] == '0'; seen--) {
        decimal->digits /= 10; /* a trailing zero */
        decimal->exponent++;
    }
    decimal->count = seen;
    return 1;
}

/* Copy 20 bytes of a Decimal's text from `from` to `to`: the digits wanted and what
 * follows them, which the caller writes over or leaves past the layout's end. (A copy of
 * a size fixed now is two moves; of a length known only at run time, a slow loop.) */
static void
put_digits(char *to, const char *from)
{
    memcpy(to, from, 20);
}

/* The text repr() writes for a float of these digits, in `text` (room for 64 bytes);
 * its length. */
static int
repr_layout(const Decimal *decimal, char *text)
{
    const char *digits = decimal->text;
    int count = decimal->count, length = 0;
    if (count == 0) {
        const char *zero = decimal->negative ? "-0.0" : "0.0";
        size_t size = strlen(zero);
        memcpy(text, zero, size);
        return (int)size;
    }
    int point = count + decimal->exponent; /* digits before the decimal point */
    if (decimal->negative) {
        text[length++] = '-';
    }
    if (point <= -4 || point > 16) { /* d.ddde-05, de+16 */
        int exponent = point - 1, magnitude = abs(point - 1);
        text[length++] = digits[0];
        if (count > 1) {
            text[length++] = '.';
            put_digits(text + length, digits + 1);
            length += count - 1;
        }
        text[length++] = 'e';
        text[length++] = exponent < 0 ? '-' : '+';
        if (magnitude >= 100) {
            text[length++] = (char)('0' + magnitude / 100);
        }
        text[length++] = (char)('0' + magnitude / 10 % 10);
        text[length++] = (char)('0' + magnitude % 10);
        return length;
    }
    if (point <= 0) { /* from -3: 0.000ddd */
        memcpy(text + length, "0.000", 5);
        length += 2 - point;
    }
    else if (point < count) { /* dd.ddd */
        put_digits(text + length, digits);
        length += point;
        text[length++] = '.';
        put_digits(text + length, digits + point);
        return length + count - point;
    }
    else { /* ddd00.0 */
        put_digits(text + length, digits); /* and '0's up to the point */
        memcpy(text + length + point, ".0", 2);
        return length + point + 2;
    }
    put_digits(text + length, digits);
    return length + count;
}

typedef unsigned __int128 Wide;

static int
times(Wide *value, Wide factor)
{
    if ((*value >> 64) == 0 && (factor >> 64) == 0) {
        *value *= factor; /* two 64-bit factors: one multiplication, which cannot overflow */
        return 1;
    }
    return !__builtin_mul_overflow(*value, factor, value);
}

static int
shifted(Wide *value, int bits)
{
    if (bits >= 127 || (bits > 0 && (*value >> (127 - bits)) != 0)) {
        return 0;
    }
    *value <<= bits;
    return 1;
}

/* 5^0 to 5^55, the powers of five that 128 bits hold (filled at import). */
#define MOST_FIVES 55
static Wide fives[MOST_FIVES + 1];

/* The order of x * 10^q and y * 2^e (-1, 0 or 1), or 2 where 128 bits do not hold it. */
static int
order(uint64_t x, int q, uint64_t y, int e)
{
    Wide left = x, right = y;
    int power = q >= 0 ? q : -q; /* 10^q is 5^q 2^q */
    if (power > MOST_FIVES || !times(q >= 0 ? &left : &right, fives[power])) {
        return 2;
    }
    int ok = q >= e ? shifted(&left, q - e) : shifted(&right, e - q);
    if (!ok) {
        return 2;
    }
    return (left > right) - (left < right);
}

/* Whether x * 10^q reaches the lower end of the decimals that read back as the double
 * m * 4 * 2^e (a tie reads as the double with the even mantissa): 1, 0, or -1 where 128
 * bits do not say. */
static int
reaches_low_end(uint64_t x, int q, uint64_t m, int e)
{
    uint64_t low = m == ((uint64_t)1 << 52) ? 4 * m - 1 : 4 * m - 2; /* a power of two */
    int above = order(x, q, low, e);
    return above == 2 ? -1 : above > 0 || (above == 0 && m % 2 == 0);
}

/* Whether x * 10^q stays within the upper end of those decimals: 1, 0 or -1, as above. */
static int
within_high_end(uint64_t x, int q, uint64_t m, int e)
{
    int below = order(x, q, 4 * m + 2, e);
    return below == 2 ? -1 : below < 0 || (below == 0 && m % 2 == 0);
}

/* Whether x * 10^q reads back as the double m * 4 * 2^e: -1 where 128 bits do not say. */
static int
reads_back(uint64_t x, int q, uint64_t m, int e)
{
    int low = reaches_low_end(x, q, m, e), high = within_high_end(x, q, m, e);
    return low < 0 || high < 0 ? -1 : low && high;
}

/* Whether the neighbour `other` of the token's digits (one unit of its last digit away)
 * rules the token out: it reads back as the same double and is closer to it, or as
 * close and even (repr rounds a half to the even digit). `side` orders the midpoint
 * between the two against the double: 1, 0, -1, with 1 where the token is closer. */
static int
neighbour_wins(const Decimal *decimal, uint64_t other, int side, uint64_t m, int e)
{
    if (side > 0) {
        return 0;
    }
    int reads = reads_back(other, decimal->exponent, m, e);
    if (reads <= 0) {
        return reads; /* 0, or -1 where 128 bits do not say */
    }
    return side < 0 || decimal->digits % 2 != 0;
}

/* The double of these bits as m 4 2^e, m of 53 bits: the ends of the interval of decimals
 * that read back as it are then (4m -+ 2) 2^e, integers times one power of two. 0 where
 * the bits are not those of a positive, normal, finite double. */
static int
binary_of(uint64_t bits, uint64_t *m, int *e)
{
    int biased = (int)(bits >> 52); /* the exponent's bits, and above them the sign's */
    if (biased < 1 || biased > 2046) {
        return 0;
    }
    *m = (bits & (((uint64_t)1 << 52) - 1)) | ((uint64_t)1 << 52);
    *e = biased - 1075 - 2;
    return 1;
}

/* The double the token reads back as, found without strtod: the quotient in doubles is
 * within two units of it, and reads_back() is exact. 0 where that does not find it. */
static int
read_back(const Decimal *decimal, uint64_t *m, int *e)
{
    static const double tens[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                  1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                  1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    int q = decimal->exponent;
    if (q < -22 || q > 22) {
        return 0;
    }
    /* The guess, then its neighbours: the bits of positive doubles count up with them. */
    static const int steps[] = {0, -1, 1, -2, 2};
    double guess = (double)decimal->digits;
    guess = q >= 0 ? guess * tens[q] : guess / tens[-q];
    uint64_t bits;
    memcpy(&bits, &guess, sizeof bits);
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        if (binary_of(bits + (uint64_t)(int64_t)steps[i], m, e) &&
            reads_back(decimal->digits, q, *m, *e) == 1) {
            return 1;
        }
    }
    return 0;
}

/* Whether 16 or 17 digits are repr's for the double m 4 2^e they read back as: 1, 0, or -1
 * where 128 bits do not say. repr writes the fewest digits that read back as the double,
 * and of those the closest. */
static int
shortest_and_closest(const Decimal *decimal, uint64_t m, int e)
{
    uint64_t digits = decimal->digits, fewer = digits / 10;
    int q = decimal->exponent;
    /* The midpoints with the neighbours against the double, positive on the token's side:
     * (2D - 1) 10^q < 2 number, and (2D + 1) 10^q > 2 number. */
    int below = order(2 * digits - 1, q, 8 * m, e), above = order(2 * digits + 1, q, 8 * m, e);
    if (below == 2 || above == 2) {
        return -1;
    }
    /* Of one digit fewer, the decimal below the token reads back when it reaches the
     * interval's lower end, and the one above when it stays within the upper end: the
     * token, between them, reads back. */
    int verdicts[4] = {
        reaches_low_end(fewer, q + 1, m, e),
        within_high_end(fewer + 1, q + 1, m, e),
        neighbour_wins(decimal, digits - 1, -below, m, e),
        neighbour_wins(decimal, digits + 1, above, m, e),
    };
    int ruled_out = 0;
    for (int i = 0; i < 4; i++) {
        if (verdicts[i] < 0) {
            return -1;
        }
        ruled_out |= verdicts[i];
    }
    return !ruled_out;
}

/* x * 10^q as the double it reads back as, where one rounding makes it: x and 10^q both
 * exact doubles (x at most 2^53, |q| at most 22), as strtod's fast path does. */
static int
exact_double(uint64_t x, int q, double *number)
{
    static const double tens[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                  1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                  1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    if (x > ((uint64_t)1 << 53) || q < -22 || q > 22) {
        return 0;
    }
    *number = q >= 0 ? (double)x * tens[q] : (double)x / tens[-q];
    return 1;
}

/* Whether 16 or 17 digits are repr's, decided in doubles where that is exact: 1 when
 * neither neighbour of the token (one unit of its last digit away) reads back as its
 * double. The decimals that read back as a double are an interval, so then no other
 * decimal of the token's length does, nor one of fewer digits (it would lie beyond a
 * neighbour): the token is the only one of the fewest digits, which repr writes. -1 where
 * a neighbour reads back too, or the doubles would not be exact: shortest_and_closest()
 * decides. A timestamp of 16 digits (1700896256.189205) is proven in half the time. */
static int
alone_in_reading_back(const Decimal *decimal)
{
    uint64_t digits = decimal->digits;
    int q = decimal->exponent;
    double number, lower, upper;
    if (!exact_double(digits + 1, q, &upper) || !exact_double(digits, q, &number) ||
        !exact_double(digits - 1, q, &lower)) {
        return -1;
    }
    return lower != number && upper != number ? 1 : -1;
}

/* The float token, written back by CPython's own repr. */
static int
written_back_as_repr(const unsigned char *start, Py_ssize_t length)
{
    char text[64]; /* float_as_repr() refuses longer tokens */
    memcpy(text, start, (size_t)length);
    text[length] = '\0';
    /* A large text is proven without the GIL: CPython's dtoa needs it back. */
    PyGILState_STATE held = PyGILState_Ensure();
    int same = 0;
    char *stop = NULL;
    double number = PyOS_string_to_double(text, &stop, NULL);
    if (number == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    else if (stop == text + length && isfinite(number)) {
        char *written = PyOS_double_to_string(number, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (written == NULL) {
            PyErr_Clear();
        }
        else {
            same = strcmp(written, text) == 0;
            PyMem_Free(written);
        }
    }
    PyGILState_Release(held);
    return same;
}

static int
float_as_repr(const Check *check, const unsigned char *start, Py_ssize_t length)
{
    char layout[64];
    Decimal decimal;
    if (length >= (Py_ssize_t)sizeof(layout) || !decimal_of(start, start + length, &decimal)) {
        return 0; /* repr never writes a float that long, nor more than 17 digits */
    }
    int laid = repr_layout(&decimal, layout);
    if (laid != length || memcmp(layout, start, (size_t)length) != 0 || decimal.count > 17) {
        return 0;
    }
    int point = decimal.count + decimal.exponent;
    if (decimal.count == 0) {
        return 1; /* 0.0 or -0.0 */
    }
    if (point < -290 || point > 290) { /* near the ends: subnormals, overflow */
        return !check->without_python && written_back_as_repr(start, length);
    }
    if (decimal.count <= 15) {
        return 1;
    }
    if (alone_in_reading_back(&decimal) == 1) {
        return 1;
    }
    uint64_t m;
    int e;
    int verdict = read_back(&decimal, &m, &e) ? shortest_and_closest(&decimal, m, e) : -1;
    if (verdict >= 0) {
        return verdict;
    }
    return !check->without_python && written_back_as_repr(start, length);
}

/* A number, as int() or repr() writes it: no "-0", no "1E5", no "1.50". */
static int
number(Check *check)
{
    const unsigned char *start = check->at;
    const unsigned char *at = start;
    const unsigned char *end = check->end;
    if (at < end && *at == '-') {
        at++;
    }
    const unsigned char *digits = at;
    if (!is_digit(at, end)) {
        return 0;
    }
    if (*at == '0') {
        at++;
    }
    else {
        while (is_digit(at, end)) {
            at++;
        }
    }
    int is_float = 0;
    if (at < end && *at == '.') {
        is_float = 1;
        at++;
        if (!is_digit(at, end)) {
            return 0;
        }
        while (is_digit(at, end)) {
            at++;
        }
    }
    if (at < end && (*at == 'e' || *at == 'E')) {
        is_float = 1;
        at++;
        if (at < end && (*at == '+' || *at == '-')) {
            at++;
        }
        if (!is_digit(at, end)) {
            return 0;
        }
        while (is_digit(at, end)) {
            at++;
        }
    }
    check->at = at;
    if (is_float) {
        return float_as_repr(check, start, at - start);
    }
    if (at - digits > MOST_INT_DIGITS) {
        return 0;
    }
    return !(at - start == 2 && start[0] == '-' && start[1] == '0');
}

static int
literal(Check *check, const char *word, Py_ssize_t length)
{
    if (check->end - check->at < length || memcmp(check->at, word, (size_t)length) != 0) {
        return 0;
    }
    check->at += length;
    return 1;
}

static int
compare_spans(const void *a, const void *b)
{
    const Span *left = a, *right = b;
    Py_ssize_t shorter = left->length < right->length ? left->length : right->length;
    int order = memcmp(left->start, right->start, (size_t)shorter);
    if (order != 0) {
        return order;
    }
    return (left->length > right->length) - (left->length < right->length);
}

/* Two quoted keys, equal. Keys of one length mostly differ in their first or last
 * letter, which is cheaper to see than to call memcmp for. */
static int
spans_equal(const Span *a, const Span *b)
{
    Py_ssize_t last = a->length - 2; /* before the closing quote; the length is at least 2 */
    return a->length == b->length && a->start[1] == b->start[1] &&
           a->start[last] == b->start[last] &&
           memcmp(a->start, b->start, (size_t)a->length) == 0;
}

/* Whether the keys from `first` on are all different. Escapes are written one
 * way only, so equal strings are equal bytes. */
static int
keys_unique(Check *check, Py_ssize_t first)
{
    Span *keys = check->keys + first;
    Py_ssize_t count = check->key_count - first;
    if (count <= FEW_KEYS) {
        for (Py_ssize_t i = 1; i < count; i++) {
            for (Py_ssize_t j = 0; j < i; j++) {
                if (spans_equal(&keys[i], &keys[j])) {
                    return 0;
                }
            }
        }
        return 1;
    }
    qsort(keys, (size_t)count, sizeof(Span), compare_spans);
    for (Py_ssize_t i = 1; i < count; i++) {
        if (spans_equal(&keys[i], &keys[i - 1])) {
            return 0;
        }
    }
    return 1;
}

static int
remember_key(Check *check, const unsigned char *start, Py_ssize_t length)
{
    if (check->key_count == check->key_capacity) {
        Py_ssize_t capacity = check->key_capacity ? check->key_capacity * 2 : 64;
        Span *keys = PyMem_RawRealloc(check->keys, (size_t)capacity * sizeof(Span));
        if (keys == NULL) {
            check->out_of_memory = 1;
            return 0;
        }
        check->keys = keys;
        check->key_capacity = capacity;
    }
    check->keys[check->key_count].start = (const char *)start;
    check->keys[check->key_count].length = length;
    check->key_count++;
    return 1;
}

/* Whether the next byte is `byte`; if so, past it. */
static int
take(Check *check, unsigned char byte)
{
    if (check->at < check->end && *check->at == byte) {
        check->at++;
        return 1;
    }
    return 0;
}

static int
object(Check *check)
{
    check->at++; /* '{' */
    if (take(check, '}')) {
        return 1;
    }
    Py_ssize_t first = check->key_count;
    do {
        const unsigned char *key = check->at;
        if (check->at >= check->end || *check->at != '"' || !string(check) ||
            !remember_key(check, key, check->at - key) || !take(check, ':') || !value(check)) {
            return 0;
        }
    } while (take(check, ','));
    if (!take(check, '}')) {
        return 0;
    }
    int unique = keys_unique(check, first);
    check->key_count = first;
    return unique;
}

static int
array(Check *check)
{
    check->at++; /* '[' */
    if (take(check, ']')) {
        return 1;
    }
    do {
        if (!value(check)) {
            return 0;
        }
    } while (take(check, ','));
    return take(check, ']');
}

static int
value(Check *check)
{
    if (check->at >= check->end) {
        return 0;
    }
    switch (*check->at) {
    case '"':
        return string(check);
    case '{':
    case '[': {
        if (++check->depth > check->max_depth) {
            return 0;
        }
        int ok = *check->at == '{' ? object(check) : array(check);
        check->depth--;
        return ok;
    }
    case 't':
        return literal(check, "true", 4);
    case 'f':
        return literal(check, "false", 5);
    case 'n':
        return literal(check, "null", 4);
    default:
        return number(check);
    }
}

int
stored_form_proven(const unsigned char *data, Py_ssize_t length, int max_depth,
                   int without_python, int *out_of_memory)
{
    Check check = {
        .at = data,
        .end = data + length,
        .max_depth = max_depth,
        .without_python = without_python,
    };
    int ok = value(&check) && check.at == check.end;
    PyMem_RawFree(check.keys);
    *out_of_memory = check.out_of_memory;
    return ok;
}

static PyObject *
proves(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "proves() takes data and max_depth");
        return NULL;
    }
    int max_depth = stored_form_max_depth(args[1]);
    if (max_depth < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    int ok, out_of_memory;
    if (data.len >= STORED_FORM_WITHOUT_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        ok = stored_form_proven(data.buf, data.len, max_depth, 0, &out_of_memory);
        Py_END_ALLOW_THREADS
    }
    else {
        ok = stored_form_proven(data.buf, data.len, max_depth, 0, &out_of_memory);
    }
    PyBuffer_Release(&data);
    if (out_of_memory) {
        return PyErr_NoMemory();
    }
    return PyBool_FromLong(ok);
}

int
stored_form_max_depth(PyObject *number)
{
    long max_depth = PyLong_AsLong(number);
    if (max_depth == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (max_depth < 0 || max_depth > 1000) {
        PyErr_SetString(PyExc_ValueError, "max_depth must be from 0 to 1000");
        return -1;
    }
    return (int)max_depth;
}

/* -- indented ------------------------------------------------------------ */

/* The indented form is written (an Output, see _stored_form.h) into the bytes object
 * that will be the answer,
 * made beforehand at 1.25 times the stored form's size (STORED_FORM_INDENT_ROOM),
 * which chat state fits (chat messages indent to 1.19 times their size), so that
 * it is written once, into one buffer, then shrunk; a document that needs more
 * room (records of numbers indent to 1.87) goes on in a buffer of its own (`own`),
 * copied into the answer at the end, as every document was before. That second
 * buffer, a megabyte for a large value, was fresh pages on each call once freed:
 * the page faults cost more than the indenting. (A first guess of twice the size
 * did no better: glibc then maps each answer anew.) */

int
stored_form_grow(Output *out, Py_ssize_t more)
{
    Py_ssize_t capacity = out->capacity * 2;
    if (capacity < out->length + more) {
        capacity = out->length + more;
    }
    char *bytes = out->own ? PyMem_RawRealloc(out->bytes, (size_t)capacity)
                           : PyMem_RawMalloc((size_t)capacity);
    if (bytes == NULL) {
        return 0;
    }
    if (!out->own) {
        memcpy(bytes, out->bytes, (size_t)out->length);
        out->own = 1;
    }
    out->bytes = bytes;
    out->capacity = capacity;
    return 1;
}

static Py_ALWAYS_INLINE inline int
new_line(Output *out, Py_ssize_t depth)
{
    if (!stored_form_reserve(out, 1 + 2 * depth)) {
        return 0;
    }
    out->bytes[out->length++] = '\n';
    memset(out->bytes + out->length, ' ', (size_t)(2 * depth));
    out->length += 2 * depth;
    return 1;
}

/* The end of the string whose opening quote is at `at` (past its closing quote). */
static const unsigned char *
string_end(const unsigned char *at, const unsigned char *end)
{
    at++;
    while (at < end) {
        at = stored_form_string_stop(at, end);
        if (at == end || *at == '"') {
            return at == end ? end : at + 1;
        }
        at += (*at == '\\' && end - at >= 2) ? 2 : 1;
    }
    return end;
}

/* Re-space the stored form from `at` to `end` into `out`; 0 when out of memory. */
static int
indent(Output *out, const unsigned char *at, const unsigned char *end)
{
    Py_ssize_t depth = 0;
    int ok = 1;
    while (ok && at < end) {
        unsigned char byte = *at;
        switch (byte) {
        case '"': {
            const unsigned char *stop = string_end(at, end);
            ok = stored_form_put(out, at, stop - at);
            at = stop;
            continue;
        }
        case '{':
        case '[':
            if (at + 1 < end && at[1] == (byte == '{' ? '}' : ']')) {
                ok = stored_form_put(out, at, 2); /* empty: {} or [] */
                at += 2;
                continue;
            }
            ok = stored_form_put(out, at, 1) && new_line(out, ++depth);
            break;
        case '}':
        case ']':
            depth = depth > 0 ? depth - 1 : 0;
            ok = new_line(out, depth) && stored_form_put(out, at, 1);
            break;
        case ',':
            ok = stored_form_put(out, ",", 1) && new_line(out, depth);
            break;
        case ':':
            ok = stored_form_put(out, ": ", 2);
            break;
        default:
            ok = stored_form_put(out, at, 1);
        }
        at++;
    }
    return ok;
}

Py_ssize_t
stored_form_indent(const unsigned char *data, Py_ssize_t length, char *room,
                   Py_ssize_t capacity, char **own)
{
    Output out = {.bytes = room, .capacity = capacity};
    int ok = indent(&out, data, data + length);
    if (out.own && !ok) {
        PyMem_RawFree(out.bytes);
    }
    *own = ok && out.own ? out.bytes : NULL;
    return ok ? out.length : -1;
}

static PyObject *
indented(PyObject *module, PyObject *arg)
{
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *answer = PyBytes_FromStringAndSize(NULL, STORED_FORM_INDENT_ROOM(data.len));
    if (answer == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    /* Nothing else holds the new bytes object: it is written without the GIL too. */
    char *room = PyBytes_AS_STRING(answer);
    Py_ssize_t capacity = PyBytes_GET_SIZE(answer);
    char *own;
    Py_ssize_t length;
    if (data.len >= STORED_FORM_WITHOUT_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        length = stored_form_indent(data.buf, data.len, room, capacity, &own);
        Py_END_ALLOW_THREADS
    }
    else {
        length = stored_form_indent(data.buf, data.len, room, capacity, &own);
    }
    PyBuffer_Release(&data);
    return stored_form_indented_answer(answer, length, own);
}

PyObject *
stored_form_indented_answer(PyObject *room, Py_ssize_t length, char *own)
{
    if (length < 0) {
        Py_DECREF(room);
        return PyErr_NoMemory();
    }
    if (own != NULL) {
        Py_DECREF(room);
        PyObject *answer = PyBytes_FromStringAndSize(own, length);
        PyMem_RawFree(own);
        return answer;
    }
    /* Shrunk in place past pymalloc's small blocks: a large answer is not copied again. */
    if (_PyBytes_Resize(&room, length) < 0) {
        return NULL;
    }
    return room;
}

static PyMethodDef methods[] = {
    {"proves", (PyCFunction)(void (*)(void))proves, METH_FASTCALL,
     "proves(data, max_depth) -> bool: whether data is the stored form of a JSON document."},
    {"indented", indented, METH_O,
     "indented(data) -> bytes: a stored form re-written with an indent of 2."},
    {"compacted", stored_form_compacted, METH_O,
     "compacted(data) -> bytes or None: data re-spelt as its stored form would be: no "
     "whitespace between tokens, strings escaped as json.dumps escapes them; None where "
     "that needs a parser, or changes nothing."},
    {"stored_text", (PyCFunction)(void (*)(void))stored_form_stored_text, METH_FASTCALL,
     "stored_text(data, max_depth) -> bytes or None: the stored form of data's document had "
     "without parsing it: data itself when proven, else its compacted form when proven."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, stored_form_add_beside},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chanstore._stored_form",
    .m_doc = "The stored form of a JSON document, proven and indented in C.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__stored_form(void)
{
    fives[0] = 1;
    for (int power = 1; power <= MOST_FIVES; power++) {
        fives[power] = fives[power - 1] * 5;
    }
    return PyModuleDef_Init(&module);
}
