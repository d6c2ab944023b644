/* Bodies proven and hashed beside the event loop, on threads that never take the GIL.
 *
 *   Beside(threads) -> a worker with threads of its own and an eventfd
 *       .fd                        the eventfd: readable while answers wait
 *       .submit(data, max_depth, indent=False)
 *                                  -> a token (int): prove `data` (a bytes object), or
 *                                  else its compacted() form, beside the caller, and hash
 *                                  what was proven with SHA-1; with `indent`, indent it
 *                                  too (as indented() does)
 *       .take()                    -> [(token, stored, sha1 hex or None, indented or
 *                                  None), ...]: the answers made since the last take,
 *                                  oldest first; `stored` is what was proven the stored
 *                                  form (`data` itself, or its compacted form), or None
 *       .close()                   stop and join the threads (idempotent); answers
 *                                  not taken are dropped
 *
 * A worker thread made in Python (a ThreadPoolExecutor) costs the event loop
 * more than it frees at 100 KB: the GIL passes back and forth at every turn
 * of the loop while the worker waits for it. These threads hold no Python
 * state at all: a job holds a reference to its bytes object (taken by submit()
 * and dropped by take(), both on the loop with the GIL), a thread reads the
 * object's bytes, which cannot change, and writes plain C fields (and, asked to
 * indent, into a bytes object that submit() made and only the job holds, as
 * indented() writes into its answer without the GIL). The proof
 * runs `without_python`: the rare float that only CPython's dtoa can decide
 * is "not proven", and the caller parses the body as it would have.
 *
 * The hash is OpenSSL's SHA1(), looked up in the libcrypto that hashlib uses
 * (chanstore.versions hashes with hashlib); where there is none, answers carry
 * None and the caller hashes. Linux only (eventfd); elsewhere the type is
 * absent and the caller makes bodies ready as before.
 */

#include "_stored_form.h"

#if defined(__linux__)

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define MOST_THREADS 8
#define DIGEST_BYTES 20

typedef unsigned char *(*Sha1Function)(const unsigned char *data, size_t length,
                                       unsigned char *digest);

/* OpenSSL's one-shot SHA1(), or NULL: found once, when the module is made. */
static Sha1Function sha1_of = NULL;

typedef struct Job {
    struct Job *next;
    PyObject *data; /* the bytes object, held from submit() to take() */
    const unsigned char *bytes;
    Py_ssize_t length;
    int max_depth;
    unsigned long long token;
    int proven;
    int out_of_memory;
    char *compacted; /* data re-spelt, when that was proven; made with PyMem_RawMalloc */
    Py_ssize_t compacted_length;
    int hashed;
    unsigned char digest[DIGEST_BYTES];
    PyObject *indented; /* the room for the indented form, or NULL: not asked */
    Py_ssize_t indented_length; /* -1: not made (not proven, or out of memory) */
    char *indented_own; /* where it went when the room was too small */
} Job;

/* A queue of jobs, oldest first. */
typedef struct {
    Job *head;
    Job *tail;
} Jobs;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t wake;
    Jobs waiting; /* submitted, not yet picked up by a thread */
    Jobs done;    /* answered, not yet taken */
    int fd;
    int stopping;
    int thread_count;
    pthread_t threads[MOST_THREADS];
    unsigned long long next_token;
    pid_t pid;
} Beside;

static void
push(Jobs *jobs, Job *job)
{
    job->next = NULL;
    if (jobs->tail == NULL) {
        jobs->head = job;
    }
    else {
        jobs->tail->next = job;
    }
    jobs->tail = job;
}

static Job *
pop(Jobs *jobs)
{
    Job *job = jobs->head;
    if (job != NULL) {
        jobs->head = job->next;
        if (jobs->head == NULL) {
            jobs->tail = NULL;
        }
    }
    return job;
}

static void
answer(Job *job)
{
    job->indented_length = -1;
    job->proven = stored_form_text(job->bytes, job->length, job->max_depth, 1,
                                   &job->out_of_memory, &job->compacted,
                                   &job->compacted_length);
    if (!job->proven) {
        return; /* the caller parses the body, and makes its ETag of what it stores */
    }
    const unsigned char *stored = job->bytes;
    Py_ssize_t length = job->length;
    if (job->compacted != NULL) {
        stored = (const unsigned char *)job->compacted;
        length = job->compacted_length;
    }
    if (sha1_of != NULL) {
        job->hashed = sha1_of(stored, (size_t)length, job->digest) != NULL;
    }
    if (job->indented != NULL) {
        job->indented_length = stored_form_indent(stored, length, PyBytes_AS_STRING(job->indented),
                                                  PyBytes_GET_SIZE(job->indented),
                                                  &job->indented_own);
    }
}

static void
free_job(Job *job)
{
    Py_DECREF(job->data);
    Py_XDECREF(job->indented);
    PyMem_RawFree(job->indented_own);
    PyMem_RawFree(job->compacted);
    PyMem_RawFree(job);
}

static void *
work(void *argument)
{
    Beside *self = argument;
    pthread_mutex_lock(&self->lock);
    for (;;) {
        while (self->waiting.head == NULL && !self->stopping) {
            pthread_cond_wait(&self->wake, &self->lock);
        }
        if (self->stopping) {
            break;
        }
        Job *job = pop(&self->waiting);
        pthread_mutex_unlock(&self->lock);
        answer(job);
        pthread_mutex_lock(&self->lock);
        int first = self->done.head == NULL;
        push(&self->done, job);
        if (first) {
            /* Only an answer that finds none waiting wakes the loop, and outside the lock,
             * which submit() and take() wait for meanwhile. take() reads the eventfd before
             * it takes the answers, so an answer pushed behind another is taken with it or
             * by the take its own write (or the first's) makes the loop call; close() joins
             * the threads before it closes the eventfd. */
            pthread_mutex_unlock(&self->lock);
            uint64_t one = 1;
            /* Cannot fail short of a counter at 2^64 - 1; the loop reads it to zero. */
            (void)!write(self->fd, &one, sizeof one);
            pthread_mutex_lock(&self->lock);
        }
    }
    pthread_mutex_unlock(&self->lock);
    return NULL;
}

/* Stop and join the threads; the jobs left are freed by the caller, with the GIL. */
static void
stop_threads(Beside *self)
{
    if (getpid() != self->pid) {
        /* A forked child: the threads were the parent's, and the lock may have been
         * held by one of them when it forked. Neither is touched here. */
        self->thread_count = 0;
        return;
    }
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_cond_broadcast(&self->wake);
    pthread_mutex_unlock(&self->lock);
    int count = self->thread_count;
    self->thread_count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < count; i++) {
        pthread_join(self->threads[i], NULL);
    }
    Py_END_ALLOW_THREADS
}

static void
free_jobs(Jobs *jobs)
{
    Job *job;
    while ((job = pop(jobs)) != NULL) {
        free_job(job);
    }
}

static void
close_beside(Beside *self)
{
    if (self->fd < 0) {
        return;
    }
    stop_threads(self);
    free_jobs(&self->waiting);
    free_jobs(&self->done);
    close(self->fd);
    self->fd = -1;
}

static PyObject *
beside_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"threads", NULL};
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i:Beside", names, &threads)) {
        return NULL;
    }
    if (threads < 1 || threads > MOST_THREADS) {
        return PyErr_Format(PyExc_ValueError, "threads must be from 1 to %d, not %d",
                            MOST_THREADS, threads);
    }
    Beside *self = (Beside *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->fd = -1;
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->wake, NULL);
    self->pid = getpid();
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    self->fd = fd;
    for (int i = 0; i < threads; i++) {
        int failed = pthread_create(&self->threads[i], NULL, work, self);
        if (failed) {
            errno = failed;
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(self); /* joins those made */
            return NULL;
        }
        self->thread_count++;
    }
    return (PyObject *)self;
}

static void
beside_dealloc(Beside *self)
{
    close_beside(self);
    pthread_mutex_destroy(&self->lock);
    pthread_cond_destroy(&self->wake);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
beside_submit(Beside *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "submit() takes data, max_depth and indent");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) {
        return PyErr_Format(PyExc_TypeError, "submit() takes bytes, not %.100s",
                            Py_TYPE(args[0])->tp_name);
    }
    int max_depth = stored_form_max_depth(args[1]);
    if (max_depth < 0) {
        return NULL;
    }
    int indent = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (indent < 0) {
        return NULL;
    }
    if (self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "submit() on a closed Beside");
        return NULL;
    }
    if (getpid() != self->pid) {
        PyErr_SetString(PyExc_RuntimeError, "a Beside has no threads in a forked process");
        return NULL;
    }
    Job *job = PyMem_RawCalloc(1, sizeof(Job));
    if (job == NULL) {
        return PyErr_NoMemory();
    }
    if (indent) {
        Py_ssize_t room = STORED_FORM_INDENT_ROOM(PyBytes_GET_SIZE(args[0]));
        job->indented = PyBytes_FromStringAndSize(NULL, room);
        if (job->indented == NULL) {
            PyMem_RawFree(job);
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    job->data = args[0];
    job->bytes = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    job->length = PyBytes_GET_SIZE(args[0]);
    job->max_depth = max_depth;
    unsigned long long token = job->token = self->next_token++;
    pthread_mutex_lock(&self->lock);
    push(&self->waiting, job);
    pthread_mutex_unlock(&self->lock);
    /* After the unlock: a thread woken under the lock would only wait for it again. */
    pthread_cond_signal(&self->wake);
    return PyLong_FromUnsignedLongLong(token);
}

static PyObject *
hex_of(const unsigned char *digest)
{
    static const char digits[] = "0123456789abcdef";
    char text[2 * DIGEST_BYTES];
    for (int i = 0; i < DIGEST_BYTES; i++) {
        text[2 * i] = digits[digest[i] >> 4];
        text[2 * i + 1] = digits[digest[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, sizeof text);
}

static PyObject *
answer_of(Job *job)
{
    if (job->out_of_memory) {
        return PyErr_NoMemory();
    }
    PyObject *stored = Py_NewRef(Py_None);
    if (job->compacted != NULL) {
        Py_SETREF(stored, PyBytes_FromStringAndSize(job->compacted, job->compacted_length));
    }
    else if (job->proven) {
        Py_SETREF(stored, Py_NewRef(job->data));
    }
    PyObject *sha1 = job->hashed ? hex_of(job->digest) : Py_NewRef(Py_None);
    if (stored == NULL || sha1 == NULL) {
        Py_XDECREF(stored);
        Py_XDECREF(sha1);
        return NULL;
    }
    PyObject *indented = Py_NewRef(Py_None);
    if (job->indented_length >= 0) {
        /* The room goes into the answer (shrunk in place), or is dropped for the form's own
         * buffer: either way the job no longer holds it. */
        Py_SETREF(indented, stored_form_indented_answer(job->indented, job->indented_length,
                                                         job->indented_own));
        job->indented = NULL;
        job->indented_own = NULL;
        if (indented == NULL) {
            Py_DECREF(stored);
            Py_DECREF(sha1);
            return NULL;
        }
    }
    return Py_BuildValue("(KNNN)", job->token, stored, sha1, indented);
}

static PyObject *
beside_take(Beside *self, PyObject *Py_UNUSED(ignored))
{
    if (self->fd < 0) {
        return PyList_New(0);
    }
    uint64_t count;
    (void)!read(self->fd, &count, sizeof count); /* to zero; EAGAIN when it was */
    pthread_mutex_lock(&self->lock);
    Jobs done = self->done;
    self->done.head = self->done.tail = NULL;
    pthread_mutex_unlock(&self->lock);
    PyObject *answers = PyList_New(0);
    Job *job;
    while ((job = pop(&done)) != NULL) {
        PyObject *one = answers == NULL ? NULL : answer_of(job);
        if (one == NULL || PyList_Append(answers, one) < 0) {
            Py_CLEAR(answers); /* the rest are freed all the same */
        }
        Py_XDECREF(one);
        free_job(job);
    }
    return answers;
}

static PyObject *
beside_close(Beside *self, PyObject *Py_UNUSED(ignored))
{
    close_beside(self);
    Py_RETURN_NONE;
}

static PyObject *
beside_fd(Beside *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->fd);
}

static PyObject *
beside_hashes(Beside *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(sha1_of != NULL);
}

static PyMethodDef beside_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))beside_submit, METH_FASTCALL,
     "submit(data, max_depth, indent=False) -> token: prove data, or else its compacted form, "
     "and hash what was proven (and with indent, indent it) beside the caller."},
    {"take", (PyCFunction)beside_take, METH_NOARGS,
     "take() -> [(token, stored or None, sha1 hex or None, indented or None)]: the answers "
     "made, oldest first."},
    {"close", (PyCFunction)beside_close, METH_NOARGS,
     "close(): stop and join the threads; answers not taken are dropped."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef beside_getset[] = {
    {"fd", (getter)beside_fd, NULL, "The eventfd, readable while answers wait; -1 once closed.",
     NULL},
    {"hashes", (getter)beside_hashes, NULL,
     "Whether answers carry the SHA-1 (OpenSSL's SHA1() was found).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BesideType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chanstore._stored_form.Beside",
    .tp_doc = "Beside(threads): bodies proven and hashed on threads that never take the GIL.",
    .tp_basicsize = sizeof(Beside),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = beside_new,
    .tp_dealloc = (destructor)beside_dealloc,
    .tp_methods = beside_methods,
    .tp_getset = beside_getset,
};

/* SHA1() of the libcrypto already loaded (by hashlib), else of the system's. */
static void
find_sha1(void)
{
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && sha1_of == NULL; i++) {
        void *library = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
        if (library == NULL) {
            library = dlopen(names[i], RTLD_NOW);
        }
        if (library != NULL) {
            sha1_of = (Sha1Function)dlsym(library, "SHA1");
        }
    }
}

int
stored_form_add_beside(PyObject *module)
{
    find_sha1();
    if (PyType_Ready(&BesideType) < 0) {
        return -1;
    }
    Py_INCREF(&BesideType);
    if (PyModule_AddObject(module, "Beside", (PyObject *)&BesideType) < 0) {
        Py_DECREF(&BesideType);
        return -1;
    }
    return 0;
}

#else /* not Linux: no Beside */

int
stored_form_add_beside(PyObject *module)
{
    return 0;
}

#endif
