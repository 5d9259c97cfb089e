package dsv3

// The exported Go trampolines that the C library calls back (through helpers.c). Their user_data
// is a runtime/cgo.Handle of a *callback. A panic in the user's function is recovered here (it
// must not unwind through the library's frames), stops the operation, and is re-raised by the
// Go caller once the C call has returned.

/*
#include <stdint.h>
*/
import "C"

import (
	"math"
	"runtime/cgo"
	"unsafe"
)

// callback is what a cgo.Handle passed as user_data refers to.
type callback struct {
	token    func(int32) bool
	progress func(float32) bool
	panicked bool
	panicVal any
}

// repanic re-raises a panic recovered in a trampoline.
func (cb *callback) repanic() {
	if cb.panicked {
		panic(cb.panicVal)
	}
}

func (cb *callback) run(f func() bool) (stop C.int32_t) {
	if cb.panicked {
		return 1
	}
	defer func() {
		if r := recover(); r != nil {
			cb.panicked, cb.panicVal, stop = true, r, 1
		}
	}()
	if f() {
		return 0
	}
	return 1
}

//export dsv3goToken
func dsv3goToken(userData unsafe.Pointer, token C.int32_t) C.int32_t {
	cb := cgo.Handle(uintptr(userData)).Value().(*callback)
	return cb.run(func() bool { return cb.token(int32(token)) })
}

//export dsv3goProgress
func dsv3goProgress(userData unsafe.Pointer, fraction C.float) C.int32_t {
	cb := cgo.Handle(uintptr(userData)).Value().(*callback)
	return cb.run(func() bool { return cb.progress(float32(fraction)) })
}

// grpoState is what a Grpo's reward callbacks share during one step: the first error or panic.
// Once one is set, later reward calls of the step return +inf at once.
type grpoState struct {
	err      error
	reward   string // the reward that returned err
	panicked bool
	panicVal any
}

// rewardCallback is what a GRPO reward's cgo.Handle refers to.
type rewardCallback struct {
	name  string
	fn    RewardFunc
	state *grpoState
}

// abortStep is what a failed reward returns to C: the library rejects a non-finite reward
// (DSV3_ERR_NON_FINITE) before any optimizer step, so the weights stay as they were.
var abortStep = C.float(math.Inf(1))

//export dsv3goReward
func dsv3goReward(userData unsafe.Pointer, prompt, completion, answer *C.char) (r C.float) {
	rc := cgo.Handle(uintptr(userData)).Value().(*rewardCallback)
	st := rc.state
	if st.err != nil || st.panicked {
		return abortStep
	}
	defer func() {
		if x := recover(); x != nil {
			st.panicked, st.panicVal, r = true, x, abortStep
		}
	}()
	var a *string
	if answer != nil {
		s := C.GoString(answer)
		a = &s
	}
	v, err := rc.fn(C.GoString(prompt), C.GoString(completion), a)
	if err != nil {
		st.err, st.reward = err, rc.name
		return abortStep
	}
	return C.float(v)
}
