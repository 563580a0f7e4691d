package datapath

// The objects are committed so that building needs no clang; make generate rebuilds
// them and make check-generate proves they match the C. lbcompat is the same program
// for kernels without the bpf_cast_to_kern_ctx kfunc (see the package doc, "Kernels");
// its maps and types are lb's.
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type flow -type flow4 -type service_key -type service -type ring_pair -type endpoint -type ct_entry -type svc_stats -type vip_key -type endpoint_nh -type range4_key -type range6_key lb bpf/lb.c -- -Ibpf
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel baseline bpf/baseline.c -- -Ibpf
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -DSHARDLB_NO_KERN_CTX" -target bpfel -no-global-types lbcompat bpf/lb.c -- -Ibpf
