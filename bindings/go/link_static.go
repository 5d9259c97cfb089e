//go:build dsv3_static

package dsv3

// Static linking (go build -tags dsv3_static): libdsv3.a is linked into the binary, which then
// needs no libdsv3.so at run time. The archive is looked up in the -L directories, those of
// CGO_LDFLAGS first, then the repository's target/release. The system libraries are those
// `cargo rustc -p dsv3-ffi --crate-type staticlib -- --print native-static-libs` lists.

/*
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -l:libdsv3.a -lgcc_s -lutil -lrt -lpthread -lm -ldl
*/
import "C"
