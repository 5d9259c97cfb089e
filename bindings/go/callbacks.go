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
