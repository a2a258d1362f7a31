#ifndef PARLEY_CNATS_SHIM_H
#define PARLEY_CNATS_SHIM_H
// The NATS C client, nats.c (Debian libnats-dev): core publish and subscribe, and JetStream's
// publish with de-duplication and fencing and its ordered consumer. Parley's broker (issue #22).
#include <nats/nats.h>
#endif
