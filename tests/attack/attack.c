/* The security suite's attack program (tests/security.rs builds it with gcc and runs it from a
 * job script, and so does the VM suite, tests/vm/scenarios/security.sh). Each attack prints one
 * line "attack NAME: refused (...)" or "attack NAME: SUCCEEDED (...)"; each comparison with the
 * machine's init (pid 1 here) prints "check NAME: ok" or "check NAME: MISMATCH (...)". The last
 * line is the verdict both suites judge by: "done: attack program, N failed", N counting every
 * success and mismatch. Usage: attack [DECOY_SUBVOLUME_ID]
 * Nothing here writes outside the machine: the btrfs destroy is aimed at the decoy id the test
 * created, cgroups are only inspected, a block device is only opened read-only. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures = 0;
static void refused(const char *name, int err) { printf("attack %s: refused (%s)\n", name, strerror(err)); }
static void succeeded(const char *name, const char *how) { printf("attack %s: SUCCEEDED (%s)\n", name, how); failures++; }
/* A system call that returned r: success is the attack succeeding. */
static void outcome(const char *name, long r, const char *how) {
    if (r >= 0) succeeded(name, how); else refused(name, errno);
}

/* The ext4 root directory's handle (inode 2, generation 0), opened through a file of the same
 * file system as `through`. */
static void handle_attack(const char *name, const char *through) {
    int mount_fd = open(through, O_RDONLY | O_PATH);
    if (mount_fd < 0) { refused(name, errno); return; }
    struct { struct file_handle fh; uint32_t ino; uint32_t gen; } h = { { 8, 1 }, 2, 0 };
    int fd = open_by_handle_at(mount_fd, &h.fh, O_RDONLY | O_DIRECTORY);
    if (fd < 0) { refused(name, errno); return; }
    char how[256] = "opened the file system's root:";
    DIR *d = fdopendir(fd);
    struct dirent *e;
    for (int n = 0; d && (e = readdir(d)) && n < 8; n++) { strncat(how, " ", 255 - strlen(how)); strncat(how, e->d_name, 255 - strlen(how)); }
    succeeded(name, how);
}

static void fanotify_attack(void) {
    int fd = fanotify_init(FAN_CLASS_NOTIF, O_RDONLY);
    if (fd < 0) { refused("fanotify_filesystem", errno); return; }
    outcome("fanotify_filesystem", fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN, AT_FDCWD, "/cache"), "marked the file system of /cache");
}

static void bpf_attack(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY; attr.key_size = 4; attr.value_size = 4; attr.max_entries = 1;
    outcome("bpf", syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr), "created a map");
}

static void perf_attack(void) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr; attr.type = PERF_TYPE_SOFTWARE; attr.config = PERF_COUNT_SW_CPU_CLOCK;
    outcome("perf_event_open_system_wide", syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0), "opened a cpu-wide event");
}

static void key_attacks(void) {
    outcome("add_key", syscall(SYS_add_key, "user", "nspawn-runner-attack", "x", 1, -4 /* user keyring */), "added a key");
    outcome("keyctl", syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -4, 0), "got the user keyring");
}

static void swapon_attack(void) {
    /* The capability check comes before the path: ENOENT means the call was allowed. */
    long r = swapon("/nonexistent-swap-decoy", 0);
    if (r == 0 || errno == ENOENT || errno == EINVAL) succeeded("swapon", "passed the privilege check");
    else refused("swapon", errno);
}

static void block_device_attack(void) {
    struct stat st;
    if (stat("/cache", &st) != 0) { refused("mknod_mount_block_device", errno); return; }
    unlink("/tmp/.attack-blk");
    if (mknod("/tmp/.attack-blk", S_IFBLK | 0600, st.st_dev) != 0) { refused("mknod_mount_block_device", errno); return; }
    int fd = open("/tmp/.attack-blk", O_RDONLY);
    int err = errno;
    if (fd >= 0) {
        char buf[512];
        succeeded("mknod_mount_block_device", read(fd, buf, sizeof buf) == 512 ? "read the host disk of /cache" : "opened the host disk of /cache");
        close(fd);
    } else {
        mkdir("/tmp/.attack-mnt", 0700);
        if (mount("/tmp/.attack-blk", "/tmp/.attack-mnt", "ext4", MS_RDONLY, NULL) == 0) {
            succeeded("mknod_mount_block_device", "mounted the host disk of /cache");
            umount2("/tmp/.attack-mnt", MNT_DETACH);
        } else refused("mknod_mount_block_device", err);
    }
    unlink("/tmp/.attack-blk");
}

/* Writes a host-wide sysctl (kernel.sysrq, which no namespace owns) through the proc at
 * `proc`, writing back the value it reads so that even a success changes nothing; 0 or errno. */
static int write_host_sysctl(const char *proc) {
    char path[128], value[32];
    snprintf(path, sizeof path, "%s/sys/kernel/sysrq", proc);
    int fd = open(path, O_RDWR);
    if (fd < 0) return errno;
    ssize_t n = read(fd, value, sizeof value);
    int err = n > 0 && pwrite(fd, value, n, 0) == n ? 0 : errno;
    close(fd);
    return err;
}

/* A mount that only exists in the job's own namespaces is no attack; what must hold is that
 * the host's kernel settings stay out of reach through it. */
static void proc_mount_outcome(const char *name, const char *proc, const char *how) {
    int err = write_host_sysctl(proc);
    if (err == 0) succeeded(name, how);
    else printf("attack %s: refused (%s, but a host sysctl stays unwritable: %s)\n", name, how, strerror(err));
}

static void remount_attack(const char *name, const char *path) {
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_BIND, NULL) == 0) {
        if (strcmp(path, "/proc/sys") == 0) proc_mount_outcome(name, "/proc", "remounted read-write");
        else succeeded(name, "remounted read-write");
        mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL);
    } else refused(name, errno);
}

static void fresh_mount_attack(const char *name, const char *fstype) {
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/.attack-%s", fstype);
    mkdir(dir, 0700);
    if (mount(fstype, dir, fstype, 0, NULL) == 0) {
        if (strcmp(fstype, "proc") == 0) proc_mount_outcome(name, dir, "mounted");
        else succeeded(name, "mounted");
        umount2(dir, MNT_DETACH);
    } else refused(name, errno);
    rmdir(dir);
}

#define BTRFS_IOC_TREE_SEARCH 0xD0009411UL
#define BTRFS_IOC_SNAP_DESTROY_V2 0x5000943FUL
static void btrfs_attacks(uint64_t decoy) {
    int fd = open("/", O_RDONLY | O_DIRECTORY);
    static uint64_t args[512];
    memset(args, 0, sizeof args);
    args[0] = 1;                          /* tree_id: the root tree */
    args[2] = (uint64_t)-1;               /* max_objectid */
    args[4] = (uint64_t)-1;               /* max_offset */
    args[6] = (uint64_t)-1;               /* max_transid */
    args[7] = 132 | ((uint64_t)132 << 32); /* min_type, max_type: ROOT_ITEM */
    args[8] = 4096;                       /* nr_items */
    outcome("btrfs_tree_search", ioctl(fd, BTRFS_IOC_TREE_SEARCH, args), "listed the subvolumes");
    if (!decoy) { refused("btrfs_snap_destroy_v2", EINVAL); return; }
    memset(args, 0, sizeof args);
    args[2] = 1 << 4; /* flags: BTRFS_SUBVOL_SPEC_BY_ID */
    args[7] = decoy;  /* subvolid */
    outcome("btrfs_snap_destroy_v2", ioctl(fd, BTRFS_IOC_SNAP_DESTROY_V2, args), "destroyed the decoy subvolume");
}

static void detach_root_attack(void) {
    pid_t pid = fork();
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0) _exit(10 + errno);
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) _exit(10 + errno);
        if (umount2("/", MNT_DETACH) != 0) _exit(10 + errno);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    if (code == 0) succeeded("detach_root", "detached / in a private mount namespace");
    else refused("detach_root", code >= 10 ? code - 10 : EPERM);
}

/* A writable cgroup.kill whose cgroup holds processes outside our pid namespace (shown as 0). */
static int foreign = 0;
static void scan_cgroups(const char *dir, int depth) {
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    FILE *f = fopen(path, "r");
    if (f) {
        char line[64];
        int zeros = 0;
        while (fgets(line, sizeof line, f)) if (atoi(line) == 0) zeros++;
        fclose(f);
        snprintf(path, sizeof path, "%s/cgroup.kill", dir);
        if (zeros && access(path, W_OK) == 0) foreign += zeros;
    }
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && depth < 8 && (e = readdir(d))) {
        if (e->d_type == DT_DIR && e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            scan_cgroups(path, depth + 1);
        }
    }
    if (d) closedir(d);
}
static void cgroup_kill_attack(void) {
    scan_cgroups("/sys/fs/cgroup", 0);
    if (foreign) { char how[64]; snprintf(how, sizeof how, "%d foreign processes behind a writable cgroup.kill", foreign); succeeded("cgroup_kill_other_job", how); }
    else refused("cgroup_kill_other_job", EPERM);
}

/* An unprivileged machine process attaching to the entered script (our parent, root). */
static void ptrace_attack(void) {
    pid_t target = getppid();
    pid_t pid = fork();
    if (pid == 0) {
        if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(200);
        if (ptrace(PTRACE_ATTACH, target, 0, 0) == 0) { ptrace(PTRACE_DETACH, target, 0, 0); _exit(0); }
        _exit(10 + errno);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    if (code == 0) succeeded("ptrace_entered_script", "attached as nobody");
    else refused("ptrace_entered_script", code >= 10 && code < 200 ? code - 10 : EPERM);
}

/* The value of `key` (e.g. "Seccomp:") in a /proc status file, or "" */
static void status_field(const char *file, const char *key, char *out, size_t size) {
    out[0] = 0;
    FILE *f = fopen(file, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, key, strlen(key)) == 0) { snprintf(out, size, "%s", line + strlen(key)); out[strcspn(out, "\n")] = 0; break; }
    }
    if (f) fclose(f);
}

static void whole_file(const char *file, char *out, size_t size) {
    out[0] = 0;
    FILE *f = fopen(file, "r");
    if (!f) return;
    size_t n = fread(out, 1, size - 1, f);
    out[n] = 0;
    fclose(f);
}

static void check(const char *name, const char *self, const char *init) {
    if (strcmp(self, init) == 0) printf("check %s: ok (%s)\n", name, self);
    else { printf("check %s: MISMATCH (self %s, init %s)\n", name, self, init); failures++; }
}

/* The script's own cgroup is a leaf beside the init's init.scope, in the hierarchies the
   machine's systemd manages: names the last component of each line of `text` that starts
   with `leaf` "<leaf>", so that the two compare equal there (and must be equal elsewhere). */
static void name_leaf(char *text, size_t size, const char *leaf) {
    static char out[8192];
    size_t o = 0;
    char *save = NULL;
    out[0] = 0;
    for (char *line = strtok_r(text, "\n", &save); line && o < sizeof out; line = strtok_r(NULL, "\n", &save)) {
        char *slash = strrchr(line, '/');
        int match = slash && strncmp(slash + 1, leaf, strlen(leaf)) == 0;
        int keep = match ? (int)(slash + 1 - line) : (int)strlen(line);
        o += snprintf(out + o, sizeof out - o, "%.*s%s\n", keep, line, match ? "<leaf>" : "");
    }
    snprintf(text, size, "%s", out);
}

static void compare_with_init(void) {
    /* Equal to init is not enough if init has no filter: nspawn's must be there (mode 2). */
    char mode[256];
    status_field("/proc/self/status", "Seccomp:", mode, sizeof mode);
    if (strcmp(mode, "\t2") == 0) printf("check seccomp_filter_mode: ok (2)\n");
    else { printf("check seccomp_filter_mode: MISMATCH (Seccomp:%s, want 2)\n", mode); failures++; }
    const char *keys[] = { "Seccomp:", "Seccomp_filters:", "NoNewPrivs:", "CapInh:", "CapEff:", "CapBnd:", "CapAmb:" };
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        char self[256], init[256];
        status_field("/proc/self/status", keys[i], self, sizeof self);
        status_field("/proc/1/status", keys[i], init, sizeof init);
        check(keys[i], self, init);
    }
    const char *files[] = { "uid_map", "gid_map", "limits", "cgroup" };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        static char self[8192], init[8192];
        char path[64];
        snprintf(path, sizeof path, "/proc/self/%s", files[i]);
        whole_file(path, self, sizeof self);
        snprintf(path, sizeof path, "/proc/1/%s", files[i]);
        whole_file(path, init, sizeof init);
        if (strcmp(files[i], "cgroup") == 0) {
            name_leaf(self, sizeof self, "nspawn-runner-script-");
            name_leaf(init, sizeof init, "init.scope");
        }
        for (char *p = self; *p; p++) if (*p == '\n') *p = '|';
        for (char *p = init; *p; p++) if (*p == '\n') *p = '|';
        check(files[i], self, init);
    }
    /* No descriptor but stdio crossed exec (the one opendir uses is ours). */
    char fds[256] = "";
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] != '.' && fd > 2 && fd != dirfd(d)) { char target[200] = ""; char p[64]; snprintf(p, sizeof p, "/proc/self/fd/%d", fd); readlink(p, target, sizeof target - 1); snprintf(fds + strlen(fds), sizeof fds - strlen(fds), " %d=%s", fd, target); }
    }
    if (d) closedir(d);
    check("fds_above_2", fds, "");
}

int main(int argc, char **argv) {
    uint64_t decoy = argc > 1 ? strtoull(argv[1], NULL, 10) : 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    compare_with_init();
    handle_attack("open_by_handle_at_cache", "/cache");
    handle_attack("open_by_handle_at_resolv_conf", "/etc/resolv.conf");
    fanotify_attack();
    bpf_attack();
    perf_attack();
    key_attacks();
    swapon_attack();
    block_device_attack();
    remount_attack("remount_proc_sys_rw", "/proc/sys");
    remount_attack("remount_sys_rw", "/sys");
    fresh_mount_attack("mount_fresh_proc", "proc");
    fresh_mount_attack("mount_fresh_sysfs", "sysfs");
    btrfs_attacks(decoy);
    detach_root_attack();
    cgroup_kill_attack();
    ptrace_attack();
    printf("done: attack program, %d failed\n", failures);
    return 0;
}
