// The rest of the wrapper: options and callbacks, info, sessions, tokenizers, trainer
// checkpoints, errors.
import Dsv3
import Foundation
import XCTest

final class ApiTests: XCTestCase {
    func fixture() throws -> Model {
        return try Model(path: try Expected.load().modelPath)
    }

    /// Runs `body`, which must throw a Dsv3Error with `status`.
    func assertThrowsStatus<T>(_ status: dsv3_status, _ body: @autoclosure () throws -> T,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), file: file, line: line) { error in
            XCTAssertEqual((error as? Dsv3Error)?.status, status, "\(error)", file: file, line: line)
        }
    }

    func testInfoAndConfig() throws {
        let model = try fixture()
        let info = model.info
        XCTAssertEqual(info.vocabSize, 99)
        XCTAssertEqual(info.hiddenSize, 32)
        XCTAssertEqual(info.numLayers, 2)
        XCTAssertEqual(info.numExperts, 8)
        XCTAssertEqual(info.numMTPModules, 0)  // the fixture has no MTP weights
        XCTAssertEqual(info.bosTokenID, 0)
        XCTAssertEqual(info.eosTokenID, 1)
        XCTAssertGreaterThan(info.paramsTotal, info.paramsActive)
        let json = try model.configJSON()
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        XCTAssertEqual(object?["vocab_size"] as? Int, 99)
    }

    func testProgressCallbackAndCancel() throws {
        let path = try Expected.load().modelPath
        var fractions: [Float] = []
        _ = try Model(path: path, options: ModelOptions(progress: { fraction in
            fractions.append(fraction)
            return true
        }))
        XCTAssertFalse(fractions.isEmpty)
        XCTAssertEqual(fractions.last, 1)
        assertThrowsStatus(DSV3_ERR_CANCELLED, try Model(path: path, options: ModelOptions(progress: { _ in false })))
        assertThrowsStatus(DSV3_ERR_UNSUPPORTED, try Model(path: path, options: ModelOptions(device: 1)))
    }

    func testGenerateStopsEarly() throws {
        let model = try fixture()
        var params = SamplingParams()
        params.maxNewTokens = 8
        var seen = 0
        let ids = try model.generate(prompt: [1, 2, 3], params: params, onToken: { _ in
            seen += 1
            return seen < 3
        })
        XCTAssertEqual(ids.count, 3)
        // a stop token ends generation and is included
        let all = try model.generate(prompt: [1, 2, 3], params: params)
        params.stopTokens = [all[1]]
        let stopped = try model.generate(prompt: [1, 2, 3], params: params)
        XCTAssertEqual(stopped, Array(all.prefix(2)))
        // sampling with a seed is reproducible
        params.stopTokens = []
        params.temperature = 1
        params.topK = 20
        params.seed = 7
        XCTAssertEqual(try model.generate(prompt: [1, 2, 3], params: params),
                       try model.generate(prompt: [1, 2, 3], params: params))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try model.generate(prompt: [1000]))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try model.generate(prompt: []))
    }

    func testSessionSlots() throws {
        let model = try fixture()
        let session = try Session(model: model, slots: 2)
        try session.append(ids: [1, 2, 3, 4], slot: 1)
        XCTAssertEqual(try session.length(slot: 1), 4)
        XCTAssertEqual(try session.length(slot: 0), 0)
        try session.truncate(slot: 1, to: 2)
        XCTAssertEqual(try session.length(slot: 1), 2)
        try session.reset(slot: 1)
        XCTAssertEqual(try session.length(slot: 1), 0)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try session.length(slot: 2))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try session.step(ids: [500]))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try Session(model: model, slots: 0))
    }

    func testTokenizer() throws {
        // the fixture's 99-id vocabulary has no tokenizer
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try Tokenizer(model: try fixture()))
        // the "tiny" preset is byte-level: the built-in byte tokenizer
        let model = try Trainer.preset("tiny").snapshotModel()
        let tok = try Tokenizer(model: model)
        XCTAssertEqual(tok.vocabSize, 259)
        let text = "héllo, wörld"
        let ids = try tok.encode(text, addSpecial: false)
        XCTAssertEqual(ids.count, text.utf8.count)
        XCTAssertEqual(try tok.decode(ids), text)
        XCTAssertEqual(try tok.tokenID("<eos>"), 257)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try tok.tokenID("no such token"))
        assertThrowsStatus(DSV3_ERR_IO, try Tokenizer(path: "/nonexistent/tokenizer.json"))
    }

    func testTrainerCheckpointAndSFT() throws {
        let e = try Expected.load()
        var params = TrainParams()
        params.schedule = .constant
        params.lr = 5e-3
        let trainer = try Trainer(model: try fixture(), params: params)
        let ids = e.train.batch.flatMap { $0 }
        let seqLen = e.train.batch[0].count
        let first = try trainer.step(ids: ids, batch: 2, seqLen: seqLen)
        XCTAssertEqual(first.step, 0)
        XCTAssertEqual(first.lr, 5e-3)
        XCTAssertEqual(first.tokens, UInt64(ids.count))
        XCTAssertTrue(first.loss.isFinite && first.gradNorm.isFinite)
        let loads = try trainer.expertLoad(moeLayer: 0)
        XCTAssertEqual(loads.count, 8)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try trainer.expertLoad(moeLayer: 5))
        // the Swift side checks shapes before C reads the arrays
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try trainer.step(ids: ids, batch: 3, seqLen: seqLen))
        let mask = [Float](repeating: 1, count: 2 * (seqLen - 1))
        let sft = try trainer.stepSFT(ids: ids, lossMask: mask, batch: 2, seqLen: seqLen)
        XCTAssertEqual(sft.step, 1)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT,
                           try trainer.stepSFT(ids: ids, lossMask: [1], batch: 2, seqLen: seqLen))

        // save, resume: the resumed trainer takes the same next step as the original
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("dsv3-swift-\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try trainer.save(to: dir.path)
        let resumed = try Trainer.load(from: dir.path, params: params)
        let a = try trainer.step(ids: ids, batch: 2, seqLen: seqLen)
        let b = try resumed.step(ids: ids, batch: 2, seqLen: seqLen)
        XCTAssertEqual(a.step, b.step)
        XCTAssertEqual(a.loss, b.loss, accuracy: 1e-5 * a.loss)
        assertThrowsStatus(DSV3_ERR_IO, try Trainer.load(from: "/nonexistent/dsv3-checkpoint"))

        // a snapshot of the weights generates like a loaded model
        let snapshot = try trainer.snapshotModel()
        var sampling = SamplingParams()
        sampling.maxNewTokens = 4
        XCTAssertEqual(try snapshot.generate(prompt: [1, 2, 3], params: sampling).count, 4)
    }
}
