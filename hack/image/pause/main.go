// Command pause is the pod sandbox's process in the lab's node stack, as Kubernetes'
// pause image: it holds the pod's namespaces, reaps orphans when it is the pod's PID 1
// and exits on SIGTERM or SIGINT. Built static and assembled by `make lab-images`.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
