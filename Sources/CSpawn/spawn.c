#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <unistd.h>

#include "CSpawn.h"

int parley_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

/// Older C libraries: closes what is open now, listed from /proc (a descriptor another thread
/// opens between this and the spawn is still inherited there).
static int parley_spawn_close_listed(posix_spawn_file_actions_t *actions, int lowest) {
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) return errno;
    int listing = dirfd(dir);
    int result = 0;
    struct dirent *entry;
    while (result == 0 && (entry = readdir(dir)) != NULL) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (end == entry->d_name || *end != '\0' || fd < lowest || fd == listing) continue;
        result = posix_spawn_file_actions_addclose(actions, (int)fd);
    }
    closedir(dir);
    return result;
}

int parley_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int lowest) {
    // PARLEY_SPAWN_LISTED (never set in the build) tries the fallback on a newer glibc.
#if defined(__GLIBC__)
#if __GLIBC_PREREQ(2, 34) && !defined(PARLEY_SPAWN_LISTED)
    return posix_spawn_file_actions_addclosefrom_np(actions, lowest);
#endif
#endif
    return parley_spawn_close_listed(actions, lowest);
}
