/* The pod sandbox's only process, as a kubelet's pause image has: it holds the pod's
 * namespaces open and does nothing else. Static, so the image is this one file. */
#include <signal.h>
#include <unistd.h>

static void quit(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    /* PID 1 of its PID namespace ignores signals it has no handler for. */
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    for (;;)
        pause();
}
