package datapath

import (
	"testing"

	"github.com/cilium/ebpf/asm"
)

// TestMapCallsHaveOneMap checks the compiled program for map helper calls that could be
// reached with more than one map: the verifier inlines a lookup (and skips the indirect
// call of update and delete) only when every path to a call passes the same map, and
// clang merges the calls of two branches that differ only in the map (ct_lookup's TCP
// and UDP maps) into one call on either. Every map helper call must therefore load its
// map into R1 in its own basic block. Both program variants are checked.
func TestMapCallsHaveOneMap(t *testing.T) {
	for _, v := range variants {
		t.Run("variant "+string(v), func(t *testing.T) { testMapCallsHaveOneMap(t, v) })
	}
}

func testMapCallsHaveOneMap(t *testing.T, v variant) {
	spec, err := loadVariant(v)
	if err != nil {
		t.Fatal(err)
	}
	mapCalls := map[int64]string{
		int64(asm.FnMapLookupElem): "lookup",
		int64(asm.FnMapUpdateElem): "update",
		int64(asm.FnMapDeleteElem): "delete",
	}
	for name, prog := range spec.Programs {
		insns := prog.Instructions
		// Basic blocks start at jump targets and at functions.
		starts := map[asm.RawInstructionOffset]bool{}
		var raw []asm.RawInstructionOffset
		iter := insns.Iterate()
		for iter.Next() {
			raw = append(raw, iter.Offset)
			ins := iter.Ins
			if ins.Symbol() != "" {
				starts[iter.Offset] = true
			}
			op := ins.OpCode.JumpOp()
			if op != asm.InvalidJumpOp && op != asm.Call && op != asm.Exit {
				starts[iter.Offset+1+asm.RawInstructionOffset(ins.Offset)] = true
			}
		}
		checked := 0
		for i, ins := range insns {
			kind, ok := mapCalls[ins.Constant]
			if !ins.IsBuiltinCall() || !ok {
				continue
			}
			checked++
			found := false
			for j := i - 1; j >= 0; j-- {
				if ins := insns[j]; ins.Dst == asm.R1 && (ins.OpCode.Class().IsALU() || ins.OpCode.Class().IsLoad()) {
					if !ins.IsLoadFromMap() {
						t.Errorf("%s: map %s call at %d takes R1 from %v, not a map load", name, kind, raw[i], ins)
					}
					found = true
					break
				}
				if starts[raw[j]] {
					break
				}
			}
			if !found {
				t.Errorf("%s: map %s call at %d gets its map from another basic block: more than one map may reach it", name, kind, raw[i])
			}
		}
		if checked == 0 {
			t.Errorf("%s: no map helper calls found", name)
		}
		t.Logf("%s: %d map helper calls, each with its own map", name, checked)
	}
}
