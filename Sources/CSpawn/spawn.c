#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>

#include "CSpawn.h"

int parley_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int parley_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int lowest) {
#if defined(__GLIBC__)
    return posix_spawn_file_actions_addclosefrom_np(actions, lowest);
#else
    (void)actions;
    (void)lowest;
    return ENOSYS;  // Parley runs on Linux with glibc (README); elsewhere spawning says so.
#endif
}
