/* Error classes of the engine's DG_E* codes (duogen.h). */
#include "duogen.h"

dg_error_class_t dg_error_class(int code) {
    switch (code) {
    case DG_EINVAL:
    case DG_EIMAGE:
    case DG_ELIMIT:
        return DG_ERROR_BAD_INPUT;
    case DG_EAGAIN:
    case DG_ENOMEM:
        return DG_ERROR_RETRYABLE;
    default:
        return DG_ERROR_FATAL;
    }
}

const char *dg_error_name(int code) {
    switch (code) {
    case DG_OK:        return "OK";
    case DG_EINVAL:    return "EINVAL";
    case DG_EIMAGE:    return "EIMAGE";
    case DG_ELIMIT:    return "ELIMIT";
    case DG_EAGAIN:    return "EAGAIN";
    case DG_ENOMEM:    return "ENOMEM";
    case DG_EMODEL:    return "EMODEL";
    case DG_EDEVICE:   return "EDEVICE";
    case DG_EINTERNAL: return "EINTERNAL";
    default:           return "EUNKNOWN";
    }
}
