module github.com/dsv3/dsv3/bindings/go

go 1.21
