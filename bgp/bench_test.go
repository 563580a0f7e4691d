package bgp

import (
	"context"
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/shardlb/shardlb/shard"
)

const failoverRuns = 5

// BenchmarkFailover measures, at FRR's kernel FIB, how long after a failure of the
// master the VIP's route points at the backup. Each iteration makes failoverRuns
// failovers and reports their median and worst. The baseline is the master
// withdrawing the VIP over a live session: FRR's own bgpd -> zebra -> kernel time,
// the floor under every other case.
func BenchmarkFailover(b *testing.B) {
	requireLab(b)
	cases := []struct {
		name string
		lab  labConfig
		// fail makes the master fail; heal brings it back as master.
		fail, heal func(b *testing.B, l *lab, m *speakerProc)
	}{
		{
			name: "baseline-withdraw",
			lab:  labConfig{bfd: 300 * time.Millisecond},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.set(b) },
			heal: func(b *testing.B, l *lab, m *speakerProc) { m.set(b, labAdv(shard.RoleMaster)) },
		},
		{
			name: "clean-stop",
			lab:  labConfig{bfd: 300 * time.Millisecond},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.signal(b, syscall.SIGTERM) },
			heal: restartMaster,
		},
		{
			name: "sigkill",
			lab:  labConfig{bfd: 300 * time.Millisecond},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.signal(b, syscall.SIGKILL) },
			heal: restartMaster,
		},
		{
			name: "link-down-bfd-100msx3",
			lab:  labConfig{bfd: 100 * time.Millisecond},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.setLink(b, false) },
			heal: relinkMaster,
		},
		{
			name: "link-down-bfd-300msx3",
			lab:  labConfig{bfd: 300 * time.Millisecond},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.setLink(b, false) },
			heal: relinkMaster,
		},
		{
			name: "link-down-hold-3s",
			lab:  labConfig{hold: 3 * time.Second},
			fail: func(b *testing.B, l *lab, m *speakerProc) { m.setLink(b, false) },
			heal: relinkMaster,
		},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			lc := tc.lab
			lc.routerASN, lc.speakerASN, lc.speakers = 65000, 65000, 2
			l := newLab(b, lc)
			master, backup := l.speakers[0], l.speakers[1]
			master.set(b, labAdv(shard.RoleMaster))
			backup.set(b, labAdv(shard.RoleBackup))
			var all []time.Duration
			for range b.N {
				var runs []time.Duration
				for range failoverRuns {
					l.waitRoute(b, labVIP, 30*time.Second, master.addr)
					start := time.Now()
					tc.fail(b, l, master)
					at := l.waitRoute(b, labVIP, 30*time.Second, backup.addr)
					runs = append(runs, at.Sub(start))
					tc.heal(b, l, master)
				}
				b.Logf("%s: %v", tc.name, runs)
				all = append(all, runs...)
			}
			slices.Sort(all)
			b.ReportMetric(ms(all[len(all)/2]), "ms-median")
			b.ReportMetric(ms(all[len(all)-1]), "ms-worst")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func restartMaster(b *testing.B, l *lab, m *speakerProc) {
	m.wait(b)
	m.start(b)
	l.waitEstablished(b, m)
	m.set(b, labAdv(shard.RoleMaster))
}

func relinkMaster(b *testing.B, l *lab, m *speakerProc) {
	m.setLink(b, true)
	l.waitEstablished(b, m)
}

// BenchmarkVIPs measures how long one speaker takes to get n VIPs into FRR's RIB
// (RIB-ms) and kernel table (kernel-ms), and the speaker's resident memory after.
// The baseline announces 100 VIPs.
func BenchmarkVIPs(b *testing.B) {
	requireLab(b)
	for _, n := range []int{100, 10000} {
		name := fmt.Sprint(n)
		if n == 100 {
			name = "baseline-100"
		}
		b.Run(name, func(b *testing.B) {
			l := newLab(b, labConfig{routerASN: 65000, speakerASN: 65000, speakers: 1})
			s := l.speakers[0]
			advs := vips(n, shard.RoleMaster)
			var rib, kernel time.Duration
			for range b.N {
				s.set(b)
				l.eventually(b, 60*time.Second, "no VIPs in FRR", func(ctx context.Context) bool {
					k, err := l.router.KernelBGPRoutes()
					sum, err2 := l.router.Summary(ctx)
					return err == nil && err2 == nil && k == 0 && sum[s.addr].PrefixesReceived == 0
				})
				start := time.Now()
				s.set(b, advs...)
				var inRIB, inKernel time.Time
				l.eventually(b, 60*time.Second, fmt.Sprintf("%d VIPs in FRR", n), func(ctx context.Context) bool {
					if inRIB.IsZero() {
						if sum, err := l.router.Summary(ctx); err == nil && sum[s.addr].PrefixesReceived == n {
							inRIB = time.Now()
						}
					}
					if inKernel.IsZero() {
						if k, err := l.router.KernelBGPRoutes(); err == nil && k == n {
							inKernel = time.Now()
						}
					}
					return !inRIB.IsZero() && !inKernel.IsZero()
				})
				rib += inRIB.Sub(start)
				kernel += inKernel.Sub(start)
			}
			b.ReportMetric(ms(rib)/float64(b.N), "RIB-ms")
			b.ReportMetric(ms(kernel)/float64(b.N), "kernel-ms")
			b.ReportMetric(s.rssMiB(b), "RSS-MiB")
		})
	}
}
