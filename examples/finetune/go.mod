module github.com/dsv3/dsv3/examples/finetune

go 1.21

require github.com/dsv3/dsv3/bindings/go v0.0.0

replace github.com/dsv3/dsv3/bindings/go => ../../bindings/go
