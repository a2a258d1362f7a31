#ifndef PARLEY_CSPAWN_H
#define PARLEY_CSPAWN_H
#include <spawn.h>

// glibc declares pipe2 and posix_spawn_file_actions_addclosefrom_np only under _GNU_SOURCE,
// which Swift's Glibc module is not built with; spawn.c defines it and calls them.

/// pipe2(fds, O_CLOEXEC): both ends close-on-exec from the start, so a child another thread
/// spawns at the same moment cannot inherit them.
int parley_pipe_cloexec(int fds[2]);

/// Adds "close every descriptor from `lowest` up" to `actions`, so the child keeps only what
/// the earlier actions set up, whatever this process holds at that moment (glibc 2.34+; an
/// older C library closes what /proc/self/fd lists now, which a thread racing it can escape).
int parley_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int lowest);

#endif
