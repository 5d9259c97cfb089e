// Command finetune fine-tunes a dsv3 model on a text file and saves a checkpoint, through the Go
// binding (bindings/go):
//
//	go run . -model DIR -data FILE.txt -steps N -out CKPT
//
// It loads the model and its tokenizer (DIR/tokenizer.json, or the byte tokenizer of a
// byte-level model), tokenizes the file, trains N AdamW steps on random windows of the token
// stream (batch 4 x 64 tokens, lr 1e-3 with warmup and cosine decay), printing the loss every 10
// steps, saves the checkpoint (loadable with dsv3.Load, `dsv3 generate --model CKPT`, or
// resumable with dsv3.LoadTrainer) and generates a short sample from the trained weights.
//
// Build the C library first: cargo build --release -p dsv3-ffi (see bindings/go/README.md).
package main

import (
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"time"

	dsv3 "github.com/dsv3/dsv3/bindings/go"
)

func main() {
	var (
		modelDir = flag.String("model", "", "model directory (config.json + safetensors [+ tokenizer.json])")
		dataPath = flag.String("data", "", "UTF-8 text file to train on")
		steps    = flag.Int("steps", 100, "optimizer steps")
		out      = flag.String("out", "", "checkpoint directory to write")
		batch    = flag.Int("batch", 4, "sequences per step")
		seqLen   = flag.Int("seq", 64, "tokens per sequence")
		lr       = flag.Float64("lr", 1e-3, "peak learning rate")
		seed     = flag.Int64("seed", 0, "seed of the window sampling and the sample")
		sample   = flag.Int("sample", 48, "tokens to generate after training (0 = none)")
	)
	flag.Parse()
	if *modelDir == "" || *dataPath == "" || *out == "" || *steps < 1 || *batch < 1 || *seqLen < 2 {
		fmt.Fprintln(os.Stderr, "usage: finetune -model DIR -data FILE.txt -steps N -out CKPT [-batch 4 -seq 64 -lr 1e-3]")
		flag.PrintDefaults()
		os.Exit(2)
	}
	if err := run(*modelDir, *dataPath, *out, *steps, *batch, *seqLen, float32(*lr), *seed, *sample); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(modelDir, dataPath, out string, steps, batch, seqLen int, lr float32, seed int64, sample int) error {
	t0 := time.Now()
	model, err := dsv3.Load(modelDir, nil)
	if err != nil {
		return err
	}
	defer model.Close()
	info, err := model.Info()
	if err != nil {
		return err
	}
	fmt.Printf("model %s: %d layers, %d experts/layer, %.2fM parameters (loaded in %.1fs)\n",
		modelDir, info.NumLayers, info.NumExperts, float64(info.ParamsTotal)/1e6, time.Since(t0).Seconds())

	tok, err := dsv3.TokenizerForModel(model)
	if err != nil {
		return fmt.Errorf("%w (put a tokenizer.json in %s)", err, modelDir)
	}
	defer tok.Close()
	text, err := os.ReadFile(dataPath)
	if err != nil {
		return err
	}
	ids, err := tok.Encode(string(text), false)
	if err != nil {
		return err
	}
	fmt.Printf("data %s: %d bytes, %d tokens\n", dataPath, len(text), len(ids))
	if len(ids) < seqLen {
		return fmt.Errorf("%s has %d tokens, fewer than one window of %d", dataPath, len(ids), seqLen)
	}

	params := dsv3.DefaultTrainParams()
	params.LR = lr
	params.MinLR = lr / 10
	params.TotalSteps = uint64(steps)
	params.WarmupSteps = min(params.WarmupSteps, uint64(steps/10))
	trainer, err := dsv3.NewTrainer(model, params)
	if err != nil {
		return err
	}
	defer trainer.Close()

	rng := rand.New(rand.NewSource(seed))
	window := make([]int32, batch*seqLen)
	t1 := time.Now()
	for s := 1; s <= steps; s++ {
		for b := 0; b < batch; b++ {
			start := rng.Intn(len(ids) - seqLen + 1)
			copy(window[b*seqLen:(b+1)*seqLen], ids[start:start+seqLen])
		}
		m, err := trainer.Step(window, batch, seqLen)
		if err != nil {
			return fmt.Errorf("step %d: %w", s, err)
		}
		if s%10 == 0 || s == steps {
			fmt.Printf("step %4d  loss %.4f  lr %.2e  grad-norm %.3f  %.0f tok/s\n",
				s, m.Loss, m.LR, m.GradNorm, m.TokensPerSec)
		}
	}
	fmt.Printf("trained %d steps in %.1fs\n", steps, time.Since(t1).Seconds())

	if err := trainer.Save(out); err != nil {
		return err
	}
	// keep the checkpoint usable with text: give it the model's tokenizer
	if err := copyFile(filepath.Join(modelDir, "tokenizer.json"), filepath.Join(out, "tokenizer.json")); err != nil &&
		!os.IsNotExist(err) {
		return err
	}
	fmt.Printf("saved checkpoint %s\n", out)

	if sample == 0 {
		return nil
	}
	tuned, err := trainer.Model()
	if err != nil {
		return err
	}
	defer tuned.Close()
	sp := dsv3.DefaultSamplingParams()
	sp.MaxNewTokens = uint32(sample)
	sp.Temperature = 0.8
	sp.TopP = 0.95
	sp.Seed = uint64(seed)
	if info.EOSTokenID >= 0 {
		sp.StopTokens = []int32{info.EOSTokenID}
	}
	prompt := ids[:min(8, len(ids))]
	gen, err := tuned.Generate(prompt, sp, nil)
	if err != nil {
		return err
	}
	sampleText, err := tok.Decode(append(append([]int32(nil), prompt...), gen...), true)
	if err != nil {
		return err
	}
	fmt.Printf("sample: %q\n", sampleText)
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	o, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(o, in); err != nil {
		o.Close()
		return err
	}
	return o.Close()
}
