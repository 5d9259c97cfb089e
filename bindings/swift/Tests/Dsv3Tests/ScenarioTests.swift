// The binding scenario every binding runs (bindings/testdata/expected.json, computed with the Rust
// API by ffi/tests/scenario.rs): load tests/fixtures/v3_tiny, greedy-generate 8 tokens, run 3
// training steps on a fixed batch, load a missing path.
//
// Run from the repository root after `cargo build --release -p dsv3-ffi`:
//   swift test --package-path bindings/swift \
//       -Xlinker -L$PWD/target/release -Xlinker -rpath -Xlinker $PWD/target/release
// The repository root is $DSV3_ROOT, else found from this file's path.
import Dsv3
import Foundation
import XCTest

/// The repository root.
let repoRoot: URL = {
    if let root = ProcessInfo.processInfo.environment["DSV3_ROOT"], !root.isEmpty {
        return URL(fileURLWithPath: root)
    }
    // bindings/swift/Tests/Dsv3Tests/ScenarioTests.swift -> the repository root
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<5 {
        url = url.deletingLastPathComponent()
    }
    return url
}()

/// bindings/testdata/expected.json.
struct Expected: Decodable {
    struct Train: Decodable {
        let batch: [[Int32]]
        let lr: Double
        let schedule: Int32
        let steps: Int
        let losses: [Double]
    }

    let model: String
    let prompt: [Int32]
    let maxNewTokens: Int
    let generated: [Int32]
    let train: Train
    let missingModel: String
    let missingModelErrorContains: String
    let lossRelTolerance: Double

    static func load() throws -> Expected {
        let url = repoRoot.appendingPathComponent("bindings/testdata/expected.json")
        let data = try Data(contentsOf: url)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(Expected.self, from: data)
    }

    /// The fixture model's directory, absolute.
    var modelPath: String {
        return repoRoot.appendingPathComponent(model).path
    }
}

/// The index of the largest value (ties: the first).
func argmax(_ values: [Float]) -> Int32 {
    var best = 0
    for i in values.indices where values[i] > values[best] {
        best = i
    }
    return Int32(best)
}

final class ScenarioTests: XCTestCase {
    func testABIVersionMatchesHeader() {
        XCTAssertEqual(Dsv3Library.abiVersion, Dsv3Library.headerABIVersion)
        XCTAssertFalse(Dsv3Library.version.isEmpty)
    }

    func testGreedyGenerationMatchesRust() throws {
        let e = try Expected.load()
        let model = try Model(path: e.modelPath)
        var params = SamplingParams()
        params.maxNewTokens = e.maxNewTokens
        var streamed: [Int32] = []
        let ids = try model.generate(prompt: e.prompt, params: params, onToken: { token in
            streamed.append(token)
            return true
        })
        XCTAssertEqual(ids, e.generated)
        XCTAssertEqual(streamed, e.generated)
    }

    func testSessionGreedyDecodeMatchesRust() throws {
        let e = try Expected.load()
        let model = try Model(path: e.modelPath)
        let session = try Session(model: model)
        var logits = try session.step(ids: e.prompt)
        XCTAssertEqual(logits.count, model.info.vocabSize)
        for want in e.generated {
            let best = argmax(logits)
            XCTAssertEqual(best, want)
            logits = try session.step(ids: [best])
        }
        XCTAssertEqual(try session.length(), e.prompt.count + e.generated.count)
    }

    func testTrainingLossesMatchRust() throws {
        let e = try Expected.load()
        let model = try Model(path: e.modelPath)
        var params = TrainParams()
        params.schedule = LRSchedule(rawValue: e.train.schedule) ?? .constant
        params.lr = Float(e.train.lr)
        let trainer = try Trainer(model: model, params: params)
        let ids = e.train.batch.flatMap { $0 }
        var losses: [Float] = []
        for i in 0..<e.train.steps {
            let m = try trainer.step(ids: ids, batch: e.train.batch.count, seqLen: e.train.batch[0].count)
            let want = e.train.losses[i]
            XCTAssertLessThanOrEqual(abs(Double(m.loss) - want), e.lossRelTolerance * want,
                                     "step \(i): loss \(m.loss), Rust gave \(want)")
            losses.append(m.loss)
        }
        XCTAssertEqual(losses.count, 3)
        XCTAssertLessThan(losses[2], losses[0], "losses decrease: \(losses)")
    }

    func testMissingModelThrowsIOError() throws {
        let e = try Expected.load()
        XCTAssertThrowsError(try Model(path: e.missingModel)) { error in
            guard let err = error as? Dsv3Error else {
                return XCTFail("not a Dsv3Error: \(error)")
            }
            XCTAssertEqual(err.status, DSV3_ERR_IO)
            XCTAssertTrue(err.message.contains(e.missingModelErrorContains), err.message)
        }
    }
}
