// OpenMPI's C interface (Debian libopenmpi-dev), for TandemMPI only.
//
// OpenMPI defines its predefined handles as macros that take the address of a global and cast
// it, e.g. `#define MPI_COMM_WORLD ((MPI_Comm) ((void *) &(ompi_mpi_comm_world)))`. Swift's
// importer only brings in macros that are plain literals, so every handle Tandem needs is
// re-exposed here as a `static inline` function returning the macro's value. Plain integer
// macros (MPI_SUCCESS, MPI_UNDEFINED, MPI_MAX_ERROR_STRING) and the MPI_THREAD_* enum import
// as they are and need no helper.
#ifndef TANDEM_CMPI_SHIM_H
#define TANDEM_CMPI_SHIM_H

#include <mpi.h>

// MARK: - Communicators

/// MPI_COMM_WORLD: address-of-global cast macro.
static inline MPI_Comm tandem_MPI_COMM_WORLD(void) { return MPI_COMM_WORLD; }
/// MPI_COMM_NULL: what MPI_Comm_split returns to a rank whose colour is MPI_UNDEFINED.
static inline MPI_Comm tandem_MPI_COMM_NULL(void) { return MPI_COMM_NULL; }

// MARK: - Datatypes

/// MPI_FLOAT: address-of-global cast macro.
static inline MPI_Datatype tandem_MPI_FLOAT(void) { return MPI_FLOAT; }
/// MPI_DOUBLE: address-of-global cast macro.
static inline MPI_Datatype tandem_MPI_DOUBLE(void) { return MPI_DOUBLE; }
/// MPI_INT64_T: address-of-global cast macro (Swift's Int64 is C's int64_t).
static inline MPI_Datatype tandem_MPI_INT64_T(void) { return MPI_INT64_T; }
/// MPI_BYTE: address-of-global cast macro; broadcast and allgather move raw bytes.
static inline MPI_Datatype tandem_MPI_BYTE(void) { return MPI_BYTE; }

// MARK: - Operations, buffers, requests, statuses, error handlers

/// MPI_SUM: address-of-global cast macro.
static inline MPI_Op tandem_MPI_SUM(void) { return MPI_SUM; }
/// MPI_IN_PLACE: `((void *) 1)`, a pointer cast Swift does not import.
static inline void *tandem_MPI_IN_PLACE(void) { return MPI_IN_PLACE; }
/// MPI_REQUEST_NULL: address-of-global cast macro; MPI_Test/MPI_Wait set a finished request to it.
static inline MPI_Request tandem_MPI_REQUEST_NULL(void) { return MPI_REQUEST_NULL; }
/// MPI_STATUS_IGNORE: `((MPI_Status *) 0)`, a pointer cast Swift does not import.
static inline MPI_Status *tandem_MPI_STATUS_IGNORE(void) { return MPI_STATUS_IGNORE; }
/// MPI_ERRORS_RETURN: address-of-global cast macro; set on every communicator so that
/// failures come back as return codes (and become Swift errors) instead of aborting the job.
static inline MPI_Errhandler tandem_MPI_ERRORS_RETURN(void) { return MPI_ERRORS_RETURN; }

#endif
